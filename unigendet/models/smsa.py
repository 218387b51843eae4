"""Symbiotic multimodal self-attention (SMSA) variants, expressed as attention layouts.

The detection sample is packed as ``[VAE image (clean, gen expert)] [ViT image] [question] [answer]``. The rule
that decides which of its splits see which (``reference``, ``paper``, ``off``) is stated once, in
:mod:`unigendet.pack.visibility`; this module turns a pack's splits and their recorded token kinds into the
:class:`~unigendet.ops.AttentionLayout` of a mode.
"""

from __future__ import annotations

from unigendet.pack import SMSA_MODES, pack_visible_splits

__all__ = ["smsa_layout", "SMSA_MODES"]


def smsa_layout(batch, mode: str, device=None):
    """The attention layout of ``batch`` under SMSA ``mode`` (``paper``, ``reference`` or ``off``).

    A pack built under ``mode`` (``PackingConfig(smsa=mode)``, what the trainer's loader and the detector do)
    carries this layout already and ``batch.layout`` itself is returned; otherwise it is built from the pack's
    splits and split kinds (host work: a device batch's order is copied back).

    Returns:
        an :class:`unigendet.ops.AttentionLayout` in the batch's (expert-contiguous) token order, on ``device``
        (default: the device of ``batch.layout``).
    """
    if mode not in SMSA_MODES:
        raise ValueError(f"mode must be one of {SMSA_MODES}, got {mode!r}")
    if mode == getattr(batch, "smsa", "reference"):
        return batch.layout if device is None else batch.layout.to(device)
    dev = batch.layout.device if device is None else device
    return build_layout(batch, mode, device=dev)


def build_layout(batch, mode: str, device=None):
    """Build the layout for any mode from the batch's splits and split kinds (``reference`` reproduces BAGEL's
    mask, the layout the packer builds)."""
    from unigendet.ops import AttentionLayout

    if mode not in SMSA_MODES:
        raise ValueError(f"mode must be one of {SMSA_MODES}, got {mode!r}")
    kinds = batch.split_kinds
    if len(kinds) != len(batch.splits) or any(len(k) != len(sp) for k, sp in zip(kinds, batch.splits)):
        raise ValueError("batch.split_kinds must give a token kind for every split (build the pack with "
                         "unigendet.data.packing.build_packed_batch)")
    for si, sample in enumerate(batch.splits):
        if sum(length for length, _ in sample) != int(batch.sample_lens[si]):
            raise ValueError(f"sample {si}: split lengths do not add up to sample_lens[{si}]")
    visible = pack_visible_splits(batch.splits, kinds, batch.sample_kind, smsa=mode)
    order = batch.order.detach().cpu() if hasattr(batch.order, "detach") else batch.order
    return AttentionLayout.from_splits(batch.splits, device=device, order=order, visible=visible)
