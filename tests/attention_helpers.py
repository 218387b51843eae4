"""Shared helpers for the attention tests: independent dense masks, a dense reference, the tolerance rule.

Everything here is written directly from the mask rules (double loops, dense softmax) and shares no code
with ``unigendet.ops.layout`` / ``unigendet.ops.attention``, so the tests compare two independent
implementations.
"""

from __future__ import annotations

import math
import random

import torch

MODES = ("full", "causal", "noise")


# --------------------------------------------------------------------------------------------------
# Dense masks built straight from the rules
# --------------------------------------------------------------------------------------------------


def mask_from_splits(samples) -> torch.Tensor:
    """BAGEL rule, token by token: bool (T, T) in the original packed order."""
    tok = []  # (sample, split index, mode, position inside split)
    for si, sample in enumerate(samples):
        for j, (length, mode) in enumerate(sample):
            for p in range(length):
                tok.append((si, j, mode, p))
    t = len(tok)
    m = torch.zeros(t, t, dtype=torch.bool)
    for a in range(t):
        sa, ja, mode_a, pa = tok[a]
        for b in range(t):
            sb, jb, mode_b, pb = tok[b]
            if sa != sb:
                continue
            if jb < ja:
                m[a, b] = mode_b != "noise"
            elif jb == ja:
                m[a, b] = mode_a != "causal" or pb <= pa
    return m


def permute_mask(mask: torch.Tensor, order) -> torch.Tensor:
    """The mask in a new token order: ``new[i, j] = old[order[i], order[j]]``."""
    o = torch.as_tensor(order, dtype=torch.long)
    return mask[o][:, o]


def mask_from_splits_vectorised(samples) -> torch.Tensor:
    """The same rule as :func:`mask_from_splits` with broadcasting (for large GPU cases)."""
    rows = [(si, j, mode, p) for si, sample in enumerate(samples) for j, (length, mode) in enumerate(sample)
            for p in range(length)]
    if not rows:
        return torch.zeros(0, 0, dtype=torch.bool)
    sample = torch.tensor([r[0] for r in rows])
    split = torch.tensor([r[1] for r in rows])
    noise = torch.tensor([r[2] == "noise" for r in rows])
    causal = torch.tensor([r[2] == "causal" for r in rows])
    pos = torch.tensor([r[3] for r in rows])
    same_sample = sample[:, None] == sample[None, :]
    earlier = (split[None, :] < split[:, None]) & ~noise[None, :]
    own = (split[None, :] == split[:, None]) & (~causal[:, None] | (pos[None, :] <= pos[:, None]))
    return same_sample & (earlier | own)


def mask_varlen(cu_q, cu_k, causal: bool) -> torch.Tensor:
    """flash-attn varlen rule: block-diagonal, bottom-right causal (j <= i + Lk - Lq)."""
    cu_q, cu_k = [int(x) for x in cu_q], [int(x) for x in cu_k]
    m = torch.zeros(cu_q[-1], cu_k[-1], dtype=torch.bool)
    for b in range(len(cu_q) - 1):
        lq, lk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        i = torch.arange(lq).unsqueeze(1)
        j = torch.arange(lk).unsqueeze(0)
        m[cu_q[b]:cu_q[b + 1], cu_k[b]:cu_k[b + 1]] = (j <= i + lk - lq) if causal else True
    return m


def mask_from_ranges(entries, total_q: int, total_k) -> list[torch.Tensor]:
    """Per-source dense masks of explicit ``(q_start, q_end, [(k_start, k_end, causal, src)])`` entries."""
    masks = [torch.zeros(total_q, tk, dtype=torch.bool) for tk in total_k]
    for qs, qe, kl in entries:
        for k0, k1, causal, src in kl:
            for q in range(qs, qe):
                for k in range(k0, k1):
                    if not causal or k - q <= k1 - qe:
                        masks[src][q, k] = True
    return masks


def random_splits(rng: random.Random, max_samples: int = 4, max_splits: int = 5, max_len: int = 6):
    """A random list of samples of (length, mode) splits, with empty and single-token splits."""
    samples = []
    for _ in range(rng.randint(1, max_samples)):
        sample = []
        for _ in range(rng.randint(0, max_splits)):
            length = rng.choice([0, 1, 1, 2, rng.randint(0, max_len)])
            sample.append((length, rng.choice(MODES)))
        samples.append(sample)
    return samples


def order_keeping_causal(rng: random.Random, samples) -> list[int]:
    """A random permutation of the packed tokens that keeps every causal split contiguous and in order."""
    blocks, pos = [], 0
    for sample in samples:
        for length, mode in sample:
            toks = list(range(pos, pos + length))
            pos += length
            if mode == "causal":
                if toks:
                    blocks.append(toks)
            else:
                blocks.extend([t] for t in toks)
    rng.shuffle(blocks)
    return [t for b in blocks for t in b]


def mask_from_backward_view(plan, src: int = 0) -> torch.Tensor:
    """Rebuild the dense mask from (k_segments, q_ptr, q_entries), checking the segment invariants."""
    m = torch.zeros(plan.total_q, plan.total_k[src], dtype=torch.bool)
    segs, ptr, qe_ = plan.k_segments.tolist(), plan.q_ptr.tolist(), plan.q_entries.tolist()
    seen = torch.zeros(plan.total_k[src], dtype=torch.int64)
    for i, (s, k0, k1) in enumerate(segs):
        if s != src:
            continue
        seen[k0:k1] += 1
        for qs, qe, diag, causal in qe_[ptr[i]:ptr[i + 1]]:
            for q in range(qs, qe):
                for k in range(k0, k1):
                    if not causal or k - q <= diag:
                        m[q, k] = True
    assert seen.numel() == 0 or int(seen.max()) <= 1, "key segments of one source overlap"
    return m


# --------------------------------------------------------------------------------------------------
# Dense reference attention
# --------------------------------------------------------------------------------------------------


def dense_attention(q, ks, vs, masks, scale=None, dtype=torch.float64, reorder=False):
    """Dense attention of q (Tq, H, D) over several sources with bool masks (Tq, Tk_src).

    GQA by repeating K/V heads; fully masked rows give out 0 and lse -inf. Computed in ``dtype``
    (fp64 for the reference; the input dtype for "plain PyTorch at that precision"); ``reorder`` scales
    K instead of Q to estimate re-ordering error. Returns (out (Tq, H, D), lse (H, Tq)), both in ``dtype``.
    """
    h, d = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kk = torch.cat([k.to(dtype).repeat_interleave(h // k.shape[1], 1) for k in ks], 0)
    vv = torch.cat([v.to(dtype).repeat_interleave(h // v.shape[1], 1) for v in vs], 0)
    mask = torch.cat(list(masks), 1)
    qq = q.to(dtype)
    if reorder:
        s = torch.einsum("qhd,khd->hqk", qq, kk * scale)
    else:
        s = torch.einsum("qhd,khd->hqk", qq * scale, kk)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1)
    p = torch.where(mask.unsqueeze(0), p, torch.zeros_like(p))  # fully masked rows: NaN -> 0
    out = torch.einsum("hqk,khd->qhd", p, vv)
    return out, lse


def max_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(d.max()) if d.numel() else 0.0


def noise_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the representational noise of ``ref`` in ``dtype`` (FA3's absolute floor)."""
    r = ref.detach().double()
    r = r[torch.isfinite(r)]
    return 2 * float(((r.to(dtype) + 0.3 - 0.3).double() - r).abs().max()) if r.numel() else 0.0


def assert_within(name: str, got, ref, pt, factor: float, dtype: torch.dtype, floor: float = 0.0):
    """``max|got - ref| <= factor * max|pt - ref| + noise floor``: the 2x (outputs) / 3x (grads) rule."""
    err, base = max_err(got, ref), max_err(pt, ref)
    bound = factor * base + noise_floor(ref, dtype) + floor
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (plain PyTorch error {base:.3e})"
