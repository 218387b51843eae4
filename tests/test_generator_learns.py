"""The tiny generator learns its domain: a short training must follow prompts far above chance (not noise)."""

import pytest

from unigendet.train.config import load_config
from unigendet.train.loop import Trainer


@pytest.mark.slow
def test_short_generation_training_follows_prompts(tmp_path):
    # Generation-heavy packs for 300 steps (about a minute on two cores): the flow must draw the caption's colour
    # and position, which pure noise, a flat canvas or a caption-blind generator cannot.
    cfg = load_config("tiny", [f"--out_dir={tmp_path}", "--stage=gduf", "--gduf.steps=300", "--data.det_ratio=1",
                               "--data.gen_ratio=10", "--data.expected_tokens=1024", "--data.max_tokens=1280",
                               "--eval_samples=0", "--gen_eval_samples=32", "--sample_images=0", "--save_every=1000"])
    gen = Trainer(cfg, progress=False).run()["generation"]
    assert gen["n"] == 32
    assert gen["prompt_score"] >= gen["chance"] + 0.3, gen
    assert gen["per_attribute"]["background"] >= 0.9, gen
