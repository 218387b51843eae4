"""Symbiotic multimodal self-attention (SMSA) variants, expressed as attention layouts.

The detection sample is packed as ``[VAE image (clean, gen expert)] [ViT image] [question] [answer]``. Three
visibility rules for its ViT (detection) tokens:

``reference``  BAGEL's prefix mask, what the public code trains: ViT tokens see the generative latents and
               themselves, not the question (it comes later). This is the layout the packer builds.
``paper``      as the paper describes SMSA: ViT tokens see the same image's generative latents, themselves and
               the instruction text (every text split before the answer), never the answer.
``off``        ablation: no token of a detection sample sees the generative latents (they still see
               themselves, so the generation expert's tokens stay well defined).

Every other rule (text causal, later splits see earlier ones, samples isolated, foreign "noise" splits hidden)
is BAGEL's, and generation/teacher samples are never changed.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["smsa_layout", "SMSA_MODES"]

SMSA_MODES = ("paper", "reference", "off")


def _host(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _runs(sorted_pos: np.ndarray) -> list[tuple[int, int]]:
    if sorted_pos.size == 0:
        return []
    breaks = np.nonzero(np.diff(sorted_pos) != 1)[0]
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks + 1, [sorted_pos.size]))
    return [(int(sorted_pos[a]), int(sorted_pos[b - 1]) + 1) for a, b in zip(starts, ends)]


def smsa_layout(batch, mode: str, device=None):
    """The attention layout of ``batch`` under SMSA ``mode`` (``paper``, ``reference`` or ``off``).

    Host work (reads ``order``, ``vit_indexes`` and ``det_indexes``; a device batch is copied back), meant to run
    once per pack, e.g. in the loader. ``reference`` returns ``batch.layout`` itself.

    Returns:
        an :class:`unigendet.ops.AttentionLayout` in the batch's (expert-contiguous) token order, on ``device``
        (default: the device of ``batch.layout``).
    """
    if mode not in SMSA_MODES:
        raise ValueError(f"mode must be one of {SMSA_MODES}, got {mode!r}")
    if mode == "reference":
        return batch.layout if device is None else batch.layout.to(device)
    dev = batch.layout.device if device is None else device
    return build_layout(batch, mode, device=dev)


def build_layout(batch, mode: str, device=None):
    """Build the layout for any mode from the batch's splits (``reference`` reproduces BAGEL's mask)."""
    from unigendet.ops import AttentionLayout

    if mode not in SMSA_MODES:
        raise ValueError(f"mode must be one of {SMSA_MODES}, got {mode!r}")
    s, nu = int(batch.seq_len), int(batch.num_und)
    order = _host(batch.order).astype(np.int64)
    if order.shape != (s,):
        raise ValueError(f"batch.order must have shape ({s},), got {order.shape}")
    new_of_old = np.empty(s, dtype=np.int64)
    new_of_old[order] = np.arange(s)
    is_vit_new = np.zeros(s, dtype=bool)
    is_vit_new[_host(batch.vit_indexes).astype(np.int64)] = True
    det_old = set(order[_host(batch.det_indexes).astype(np.int64)].tolist())

    entries = []
    pos = 0
    for si, sample in enumerate(batch.splits):
        kind = batch.sample_kind[si] if si < len(batch.sample_kind) else "gen"
        info = []  # (runs, mode, type, contains_det)
        for length, smode in sample:
            new = np.sort(new_of_old[pos : pos + length])
            if length and (new >= nu).any():
                typ = "gen"
            elif length and is_vit_new[new].any():
                typ = "vit"
            else:
                typ = "text"
            has_det = any(p in det_old for p in range(pos, pos + length))
            info.append((_runs(new), smode, typ, has_det))
            pos += length
        if sum(len for len, _ in sample) != int(batch.sample_lens[si]):
            raise ValueError(f"sample {si}: split lengths do not add up to sample_lens[{si}]")
        answer = next((j for j, it in enumerate(info) if it[3]), len(info))
        det = kind == "det" and mode != "reference"
        for j, (runs, smode, typ, _) in enumerate(info):
            if not runs:
                continue
            visible = [i for i in range(j) if info[i][1] != "noise"]
            if det and mode == "paper" and typ == "vit":
                visible += [i for i in range(j + 1, answer) if info[i][2] == "text"]
            if det and mode == "off" and typ != "gen":
                visible = [i for i in visible if info[i][2] != "gen"]
            keys = [(a, b, False, 0) for i in visible for a, b in info[i][0]]
            if smode == "causal":
                if len(runs) != 1:
                    raise ValueError(f"sample {si} split {j}: a causal split must be contiguous in batch order")
                keys.append((runs[0][0], runs[0][1], True, 0))
            else:
                keys += [(a, b, False, 0) for a, b in runs]
            entries += [(a, b, keys) for a, b in runs]
    if pos != s:
        raise ValueError(f"splits cover {pos} tokens, batch.seq_len is {s}")
    return AttentionLayout.from_ranges(entries, total_q=s, device=device)
