"""The SMSA visibility rule, in one place.

A packed sample is a list of *splits* (BAGEL's unit of attention), each with an attention mode (``full``,
``causal`` or ``noise``, see :data:`unigendet.ops.layout.MODES`) and a token *kind* recorded by the packer:

``text``    prompt or caption text (a question, a DIGA forensic prompt, a generation caption);
``answer``  the text that carries a detection sample's verdict (its first token is the detection head's input);
``vit``     SigLIP (understanding-expert) image tokens;
``gen``     VAE latent (generation-expert) image tokens.

BAGEL's rule (:func:`unigendet.ops.layout.prefix_visible`): a split sees every earlier split of its sample except
other samples' and foreign ``noise`` splits, and itself fully or causally. SMSA changes what the splits of a
*detection* sample see (generation and DIGA teacher samples always keep BAGEL's rule):

``reference``  BAGEL's rule unchanged, what the public code trains: the ViT tokens see the generative latents
               and themselves, not the question (it comes later).
``paper``      as the paper describes SMSA: the ViT tokens also see the instruction text (every text split after
               them and before the answer), never the answer.
``off``        ablation: no token of a detection sample sees the generative latents (the latents still see
               themselves, so the generation expert's tokens stay well defined).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SMSA_MODES", "SPLIT_KINDS", "answer_visible_splits", "pack_visible_splits", "visible_splits"]

SMSA_MODES = ("paper", "reference", "off")
SPLIT_KINDS = ("text", "answer", "vit", "gen")


def _check(modes: Sequence[str], kinds: Sequence[str], smsa: str) -> None:
    if smsa not in SMSA_MODES:
        raise ValueError(f"smsa must be one of {SMSA_MODES}, got {smsa!r}")
    if len(modes) != len(kinds):
        raise ValueError(f"modes and kinds must have the same length, got {len(modes)} and {len(kinds)}")
    bad = [k for k in kinds if k not in SPLIT_KINDS]
    if bad:
        raise ValueError(f"split kinds must be in {SPLIT_KINDS}, got {bad[0]!r}")


def visible_splits(modes: Sequence[str], kinds: Sequence[str], *, detection: bool, smsa: str) -> list[list[int]]:
    """Per split ``j`` of one sample, the other splits of the sample whose keys its queries see (ascending).

    Args:
        modes: each split's attention mode (``full`` / ``causal`` / ``noise``).
        kinds: each split's token kind (:data:`SPLIT_KINDS`).
        detection: whether the sample is a detection sample (only those change under SMSA).
        smsa: the SMSA mode (:data:`SMSA_MODES`).

    Returns:
        one list per split; what a split sees of itself follows its mode (full or causal), as in
        :meth:`unigendet.ops.AttentionLayout.from_splits`.
    """
    from unigendet.ops.layout import prefix_visible

    _check(modes, kinds, smsa)
    visible = prefix_visible(modes)
    if not detection or smsa == "reference":
        return visible
    answer = next((j for j, k in enumerate(kinds) if k == "answer"), len(kinds))
    out = []
    for j, vis in enumerate(visible):
        if smsa == "paper" and kinds[j] == "vit":
            vis = vis + [i for i in range(j + 1, answer) if kinds[i] == "text"]
        elif smsa == "off" and kinds[j] != "gen":
            vis = [i for i in vis if kinds[i] != "gen"]
        out.append(vis)
    return out


def answer_visible_splits(modes: Sequence[str], kinds: Sequence[str], *, detection: bool, smsa: str) -> list[int]:
    """The splits an answer appended after the given ones sees: what a decoder's prefix cache must hold."""
    return visible_splits([*modes, "causal"], [*kinds, "answer"], detection=detection, smsa=smsa)[-1]


def pack_visible_splits(splits, split_kinds, sample_kinds, *, smsa: str) -> list[list[list[int]]]:
    """:func:`visible_splits` for every sample of a pack: ``splits`` (per sample ``(length, mode)`` pairs), their
    ``split_kinds`` and the samples' kinds (``"det"`` marks a detection sample); what
    :meth:`unigendet.ops.AttentionLayout.from_splits` takes as ``visible``."""
    return [visible_splits([m for _, m in sp], kinds, detection=si < len(sample_kinds) and sample_kinds[si] == "det",
                           smsa=smsa)
            for si, (sp, kinds) in enumerate(zip(splits, split_kinds))]
