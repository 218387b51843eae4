"""The procedural generation domain: rendering, captions, the exact prompt checks, the DCT autoencoder, scoring."""

import numpy as np
import pytest
import torch

from unigendet.data import scenes as S
from unigendet.eval.fid import preprocess_image
from unigendet.eval.generation import score_generation
from unigendet.models.config import VAEConfig, get_config
from unigendet.models.vae import DCTVAE, build_vae, dct_basis


def _scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [S.sample_scene(rng) for _ in range(n)]


def test_every_rendered_scene_reads_back_as_its_caption():
    sc = _scenes(600)
    images = [S.render(s, 64) for s in sc]
    prompts = [S.caption(s, i) for i, s in enumerate(sc)]
    r = S.prompt_score(images, prompts)
    assert r["prompt_score"] == 1.0 and r["exact"] == 1.0
    for s, p in zip(sc, prompts):
        assert S.parse_caption(p) == s.attributes()


def test_chance_is_the_score_of_images_of_other_scenes_and_noise_scores_near_it():
    sc = _scenes(3000, seed=1)
    images = [S.render(s, 64) for s in sc]
    prompts = [S.caption(s) for s in sc]
    rng = np.random.default_rng(2)
    shuffled = [prompts[i] for i in rng.permutation(len(prompts))]
    assert S.prompt_score(images, shuffled)["prompt_score"] == pytest.approx(S.CHANCE, abs=0.02)
    assert S.CHANCE == pytest.approx((1 / 6 + 1 / 3 + 1 / 4 + 1 / 2) / 4)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(300)]
    assert S.prompt_score(noise, prompts[:300])["prompt_score"] < S.CHANCE + 0.1
    flat = [np.full((64, 64, 3), S.BACKGROUNDS[S.parse_caption(p)["background"]], np.uint8) for p in prompts[:300]]
    # an empty canvas of the right background gets only that attribute
    assert S.prompt_score(flat, prompts[:300])["prompt_score"] == pytest.approx(0.25)


def test_a_single_wrong_attribute_costs_a_quarter():
    s = _scenes(1)[0]
    other = {"circle": "square", "square": "triangle", "triangle": "circle"}[s.shape]
    wrong = S.Scene(s.colour, other, s.position, s.background, s.cx, s.cy, s.size)
    r = S.prompt_score([S.render(wrong)], [S.caption(s)])
    assert r["prompt_score"] == 0.75 and r["per_attribute"]["shape"] == 0.0


def test_parse_caption_rejects_other_text():
    with pytest.raises(ValueError, match="not a scene caption"):
        S.parse_caption("a photo of a tabby cat")
    assert all(S.parse_caption(c) for c in S.scene_captions())
    assert len(S.scene_captions()) == 2 * 6 * 3 * 4 * 2


def test_dct_basis_is_orthonormal():
    b = dct_basis(8, 3).reshape(9, -1)
    assert torch.allclose(b @ b.T, torch.eye(9, dtype=b.dtype), atol=1e-12)


def test_dct_autoencoder_round_trips_and_keeps_scenes_readable():
    vae = build_vae(VAEConfig(kind="dct", z_channels=27, downsample=8, scale_factor=1.5, shift_factor=0.0))
    assert isinstance(vae, DCTVAE)
    sc = _scenes(64, seed=3)
    x = torch.tensor(np.stack([S.render(s) for s in sc])).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = vae.encode(x)
    assert z.shape == (64, 27, 8, 8)
    assert 0.4 < float(z.std()) < 2.0  # comparable to the unit noise of the flow
    rec = vae.decode(z)
    torch.testing.assert_close(vae.encode(rec), z, atol=1e-4, rtol=0)  # decode is a right inverse
    u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    assert S.prompt_score(list(u8), [S.caption(s) for s in sc])["prompt_score"] >= 0.98  # a low-pass blurs some corners
    with pytest.raises(ValueError, match="z_channels must be 3"):
        VAEConfig(kind="dct", z_channels=26, downsample=8)


def test_the_tiny_preset_generates_in_a_latent_narrower_than_its_hidden_size():
    cfg = get_config("tiny")
    assert cfg.vae.kind == "dct"
    assert cfg.patch_latent_dim <= cfg.llm.hidden_size
    assert cfg.timestep_embed_scale == 1000.0
    assert get_config("bagel-7b-mot").timestep_embed_scale == 1.0  # BAGEL's own convention


def test_score_generation_reports_prompt_score_and_fid_against_activations():
    sc = _scenes(12, seed=4)
    images = [S.render(s) for s in sc]
    prompts = [S.caption(s) for s in sc]

    class Features:  # a stand-in extractor: mean colour and spread (the FID plumbing, not Inception)
        image_size = 8
        model_path = "stand-in"
        input_range = "pt"

        def __call__(self, batch):
            x = torch.as_tensor(np.asarray(batch)).float()
            return torch.cat([x.mean(dim=(1, 2)), x.std(dim=(1, 2))], dim=1)

    ref = np.asarray(Features()(np.stack([preprocess_image(i, 8) for i in images])))
    r = score_generation(images, prompts, reference=ref, extractor=Features())
    assert r["prompt_score"] == 1.0 and r["chance"] == S.CHANCE and r["n"] == 12
    assert r["fid"] == pytest.approx(0.0, abs=1e-3)
    noise = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(12)]
    r2 = score_generation(noise, prompts, reference=ref, extractor=Features())
    assert r2["prompt_score"] < 0.5 and r2["fid"] > 100
    assert "prompt_score" not in score_generation(images, ["a photo of a cat"] * 12)
