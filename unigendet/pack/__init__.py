"""Packing rules: which tokens of a packed multimodal sample see which.

:mod:`unigendet.pack.visibility` states the SMSA visibility rule once; the packer (:mod:`unigendet.data.packing`),
the training layouts (:func:`unigendet.models.smsa_layout`) and the detector's decoding prefix
(:mod:`unigendet.inference.detect`) all derive their attention from it.
"""

from .visibility import SMSA_MODES, SPLIT_KINDS, answer_visible_splits, pack_visible_splits, visible_splits

__all__ = ["SMSA_MODES", "SPLIT_KINDS", "answer_visible_splits", "pack_visible_splits", "visible_splits"]
