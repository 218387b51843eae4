"""Scores for generated images: prompt following (scene prompts) and FID, one function for training and CLI.

:func:`score_generation` takes the generated images and their prompts and returns

* ``prompt_score``, ``chance``, ``exact``, ``per_attribute`` (:func:`unigendet.data.scenes.prompt_score`) when every
  prompt is a scene caption of the embedded data set (else these keys are absent);
* ``fid`` against a reference: a folder of real images, a ``.npz`` of Inception statistics, or reference
  activations; with the bundled Inception unless an extractor is given.

:func:`scene_reference_activations` computes (once, cached next to the data set) the Inception features of the
held-out scenes, so a training run pays only for its own images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = ["as_uint8", "scene_reference_activations", "score_generation"]


def as_uint8(image) -> np.ndarray:
    """``(3, H, W)`` float tensor in [-1, 1], PIL image or uint8 array -> ``(H, W, 3)`` uint8 array."""
    if hasattr(image, "detach"):
        t = image.detach().float().cpu().clamp(-1, 1)
        return ((t + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.asarray(image, dtype=np.uint8)


def _all_scene_prompts(prompts: Sequence[str]) -> bool:
    from unigendet.data.scenes import parse_caption

    try:
        for p in prompts:
            parse_caption(p)
    except ValueError:
        return False
    return True


def scene_reference_activations(dataset, extractor, *, progress: bool = False) -> np.ndarray:
    """Inception features of the held-out scenes of an :class:`~unigendet.data.embedded.EmbeddedDataset`.

    Cached as ``fid_reference.npy`` in the data set folder, keyed by the extractor's network file.
    """
    import hashlib
    import json

    from .fid import compute_activations

    tag = hashlib.sha256(f"{extractor.model_path}:{extractor.input_range}".encode()).hexdigest()[:8]
    path = os.path.join(dataset.root, f"fid_reference-{tag}.npy")
    if os.path.isfile(path):
        return np.load(path, allow_pickle=False)
    with open(dataset.generation_test_manifest, encoding="utf-8") as f:
        records = json.load(f)
    files = [os.path.join(dataset.laion_root, r["image_path"]) for r in records]
    acts = compute_activations(files, extractor, progress=progress, desc="FID reference")
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, acts)
    os.replace(tmp, path)
    return acts


def score_generation(
    images: Sequence,
    prompts: Sequence[str],
    *,
    reference=None,
    extractor=None,
    batch_size: int = 50,
    progress: bool = False,
) -> dict:
    """Prompt-following score (scene prompts) and FID of ``images`` generated from ``prompts``.

    Args:
        images: generated images (tensors in [-1, 1], PIL images or uint8 arrays).
        prompts: their prompts, one per image.
        reference: ``None`` (no FID), a folder of real images, a ``.npz`` statistics file, or an ``(N, D)`` array of
            reference activations from the same extractor.
        extractor: an :class:`~unigendet.eval.fid.InceptionFeatureExtractor` (default: the bundled Inception).
    """
    from unigendet.data.scenes import prompt_score

    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    arrays = [as_uint8(im) for im in images]
    out: dict = {"n": len(arrays)}
    if arrays and _all_scene_prompts(prompts):
        out.update(prompt_score(arrays, prompts))
    if reference is not None:
        from .fid import (
            InceptionFeatureExtractor,
            activation_statistics,
            compute_activations,
            frechet_distance,
            frechet_distance_from_activations,
            list_images,
            load_statistics,
        )

        if len(arrays) < 2:
            raise ValueError(f"FID needs at least 2 generated images, got {len(arrays)}")
        ext = extractor if extractor is not None else InceptionFeatureExtractor()
        acts = compute_activations(arrays, ext, batch_size=batch_size, progress=progress, desc="FID generated")
        if isinstance(reference, np.ndarray):
            out["fid"] = float(frechet_distance_from_activations(acts, reference))
        elif os.path.isfile(os.fspath(reference)) and os.fspath(reference).endswith(".npz"):
            mu, sigma = activation_statistics(acts)
            out["fid"] = float(frechet_distance(mu, sigma, *load_statistics(reference)))
        else:
            ref = compute_activations(list_images(reference), ext, batch_size=batch_size, progress=progress,
                                      desc="FID reference")
            out["fid"] = float(frechet_distance_from_activations(acts, ref))
    return out
