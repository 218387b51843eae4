"""Co-evolution rounds: the generator's own fakes for the next detector, and the detectors compared at the end.

From round 2 on (``--rounds N``), GDUF retrains the detector on data that includes images the current generator made
from training captions, labelled fake (:func:`self_generated_fakes`), in the places of as many of the data set's
fakes (:func:`detection_records_with`); the same call draws images from held-out scene prompts that are never
trained on. At the end of the run :func:`compare_detectors` runs the first round's detector
and the last one on the same images: fresh samples of the final generator, the held-out samples of the first round's
generator, and the held-out real photographs (:func:`coevolution_report`, :func:`fake_rates`).
"""

from __future__ import annotations

import os

import torch

from unigendet.prompts import FAKECLUE_QUESTION

from .distributed import full_model_state, is_sharded
from .evaluation import heldout_scene_prompts, save_images
from .state import load_sharded
from .teacher import snapshot_dir

__all__ = ["compare_detectors", "coevolution_report", "detection_records_with", "fake_rates",
           "self_generated_fakes"]


def self_generated_fakes(trainer, rnd: int) -> list:
    """Images the current generator makes from training captions, as fake detection records.

    The same call also draws ``coevolution_heldout`` images from held-out scene prompts into
    ``round<rnd>/heldout_fakes`` (never trained on), on which the end of the run compares the detectors.
    """
    from unigendet.data import DetectionRecord
    from unigendet.inference import ImageGenerator

    cfg = trainer.cfg
    n = max(1, min(len(trainer.gen_records), cfg.coevolution_fakes))
    prompts = [r.prompt for r in trainer.gen_records[:n]]
    heldout = []
    if cfg.data.source == "embedded" and cfg.coevolution_heldout > 0:
        heldout = heldout_scene_prompts(cfg.coevolution_heldout, offset=cfg.gen_eval_samples)
    folder = os.path.join(trainer.out_dir, f"round{rnd}", "fakes")
    model = trainer.model
    if is_sharded(model):  # sampling calls into the model outside forward(): use a whole copy
        model = trainer._plain_copy(full_model_state(model, all_ranks=True))
    gen = ImageGenerator(model, trainer.tokenizer, trainer.packing, steps=cfg.sample_steps)
    images = gen.generate(prompts + heldout, seed=cfg.seed + rnd, progress=trainer.progress)
    del gen, model
    if heldout and trainer.dist.is_main:
        save_images(images[n:], os.path.join(trainer.out_dir, f"round{rnd}", "heldout_fakes"))
    records = []
    # Every rank writes the same self-generated fakes (save_images renames each file into place).
    for i, path in enumerate(save_images(images[:n], folder)):
        records.append(DetectionRecord(
            id=f"selfgen-r{rnd}-{i}", image=path, label=0, cate="self-generated",
            question=FAKECLUE_QUESTION,
            answer="This is a fake image. It was synthesised by the current generator: "
                   "its textures and colours carry the generator's own rendering artefacts."))
    return records


def detection_records_with(records: list, self_generated: list, *, balance: bool) -> list:
    """A round's detection records: the data set's and the generator's own fakes. With ``balance`` (the data's
    ``balance_classes``) the self-generated fakes take the places of as many of the data set's fakes (the last ones
    of its seeded order), so the classes stay balanced however many fakes a round adds."""
    if not self_generated or not balance:
        return list(records) + list(self_generated)
    drop = min(len(self_generated), sum(r.label == 0 for r in records))
    kept = []
    for r in reversed(records):
        if r.label == 0 and drop > 0:
            drop -= 1
            continue
        kept.append(r)
    return kept[::-1] + list(self_generated)


def compare_detectors(trainer) -> dict:
    """Round 1's detector against the final one on the final generator's held-out samples, round 1's generator's
    held-out samples (drawn when round 2 began, never trained on) and the held-out real photos."""
    cfg = trainer.cfg

    def pngs(folder):
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png")) \
            if os.path.isdir(folder) else []

    sets = {
        "final_generator_heldout": pngs(os.path.join(trainer.out_dir, "generated")),
        "round1_generator_heldout": pngs(os.path.join(trainer.out_dir, "round2", "heldout_fakes")),
        "real_photos": [r.image for r in trainer.test_records if r.label == 1][: cfg.eval_samples // 2],
    }
    first = trainer._plain_copy(load_sharded(snapshot_dir(trainer.out_dir, 1)))
    detectors = {"round1_detector": first, f"round{cfg.rounds}_detector": trainer.model}
    report = coevolution_report(detectors, trainer.tokenizer, trainer.packing, sets, smsa=cfg.smsa,
                                progress=trainer.progress)
    del first
    return {"detectors": report, "images": {k: len(v) for k, v in sets.items()},
            "note": "fake_rate: share of images the detection head calls fake; real_accuracy: share of the "
                    "held-out real photographs it calls real"}


def fake_rates(model, tokenizer, packing, paths: list[str], *, smsa: str, progress: bool) -> dict:
    """The detection head's verdicts on ``paths``: ``{"fake_rate", "mean_prob_fake", "n"}``."""
    from unigendet.inference import Detector

    was_training = model.training
    model.eval()
    det = Detector(model, tokenizer, packing, smsa=smsa, max_new_tokens=1)  # the head decides from the prefix
    with torch.no_grad():
        results = det.detect(paths, batch_size=16, progress=progress)
    model.train(was_training)
    n = len(results)
    return {"fake_rate": sum(r.label == 0 for r in results) / n,
            "mean_prob_fake": sum(r.prob_fake for r in results) / n, "n": n}


def coevolution_report(detectors: dict, tokenizer, packing, image_sets: dict[str, list[str]], *, smsa: str,
                       progress: bool) -> dict:
    """``{detector name: {image set name: fake_rates(...)}}`` for every pair, plus the accuracy on real photos.

    ``image_sets`` maps a name to image paths; a name starting with ``real`` reports ``real_accuracy`` (the share
    called real) instead of the fake rate being the goal, both are always present.
    """
    out: dict = {}
    for name, model in detectors.items():
        row = {}
        for set_name, paths in image_sets.items():
            if not paths:
                continue
            r = fake_rates(model, tokenizer, packing, paths, smsa=smsa, progress=progress)
            if set_name.startswith("real"):
                r["real_accuracy"] = 1.0 - r["fake_rate"]
            row[set_name] = r
        out[name] = row
    return out
