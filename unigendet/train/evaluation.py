"""End-of-run evaluation of the generative half (what ``summary.json`` reports under ``generation``).

* :func:`evaluate_generation`: images from held-out scene prompts of the embedded data set, their prompt-following
  score and FID against the held-out scenes (bundled Inception), and ``samples.png`` with each prompt under its
  image.
* :func:`generate`, :func:`save_images`, :func:`heldout_scene_prompts`: the pieces it shares with co-evolution
  (:mod:`unigendet.train.coevolution`).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("unigendet.train")

__all__ = ["evaluate_generation", "generate", "heldout_scene_prompts", "save_images"]


def heldout_scene_prompts(n: int, offset: int = 0) -> list[str]:
    """Prompts ``offset .. offset + n`` of the embedded data set's held-out scenes (never trained on)."""
    import json

    from unigendet.data.embedded import embedded_dataset

    with open(embedded_dataset().generation_test_manifest, encoding="utf-8") as f:
        records = json.load(f)
    return [r["prompt"] for r in records[offset : offset + n]]


def save_images(images, folder: str) -> list[str]:
    """Write ``images`` (``(3, H, W)`` in [-1, 1]) as ``folder/00000.png`` ...; returns the paths.

    Each file is written under a temporary name and renamed into place, so a reader (or another rank writing the
    same file) never sees a half-written image."""
    from PIL import Image

    from unigendet.eval.generation import as_uint8

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = os.path.join(folder, f"{i:05d}.png")
        tmp = f"{path}.{os.getpid()}.tmp"
        Image.fromarray(as_uint8(img)).save(tmp, format="PNG")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def generate(model, tokenizer, packing, prompts, *, seed: int, steps: int, progress: bool):
    """Images for ``prompts`` (``ImageGenerator.generate`` runs without gradients in eval mode, then restores it)."""
    from unigendet.inference import ImageGenerator

    return ImageGenerator(model, tokenizer, packing, steps=steps).generate(prompts, seed=seed, progress=progress)


def evaluate_generation(model, tokenizer, packing, *, n: int, seed: int, steps: int, out_dir: str,
                        sample_images: int, progress: bool) -> tuple[dict, list]:
    """Generate ``n`` held-out scene prompts, score them, draw the sample grid; returns ``(summary, images)``."""
    from unigendet.data.embedded import embedded_dataset
    from unigendet.eval.generation import scene_reference_activations, score_generation

    from .logs import plot_samples

    prompts = heldout_scene_prompts(n)
    images = generate(model, tokenizer, packing, prompts, seed=seed, steps=steps, progress=progress)
    save_images(images, os.path.join(out_dir, "generated"))
    reference = extractor = None
    fid_note = None
    try:
        from unigendet.eval.fid import InceptionFeatureExtractor

        extractor = InceptionFeatureExtractor()
        reference = scene_reference_activations(embedded_dataset(), extractor, progress=progress)
    except (FileNotFoundError, ImportError) as e:  # no bundled Inception: the prompt score still counts
        fid_note = f"FID skipped: {e}"
        log.warning("%s", fid_note)
    result = score_generation(images, prompts, reference=reference, extractor=extractor, progress=progress)
    result.update(steps=steps, seed=seed, prompts="held-out scenes of the embedded data set (laion/test_metadata.json)")
    if fid_note:
        result["fid"], result["fid_note"] = None, fid_note
    if sample_images > 0:
        path = os.path.join(out_dir, "samples.png")
        title = f"prompt score {result['prompt_score']:.2f} (chance {result['chance']:.2f})"
        if plot_samples(images[:sample_images], prompts[:sample_images], path, title=title):
            result["samples"] = path
    return result, images
