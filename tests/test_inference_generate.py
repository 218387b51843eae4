"""Text-to-image inference: determinism, shapes, and the packed cond/uncond pass equals separate passes."""

import pytest
import torch

from unigendet.data import PackingConfig
from unigendet.data.packing import ImageItem, SamplePlan, TextItem, build_packed_batch
from unigendet.inference import ImageGenerator, tensor_to_pil
from unigendet.models import UniGenDet, get_config
from unigendet.sampling import flow_euler_sample
from unigendet.tokenizer import load_tokenizer

PROMPTS = ["a photo of a cat", "a brick wall, dark"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = UniGenDet(get_config("tiny")).float().eval()
    # BAGEL zero-initialises llm2vae, which would make every velocity 0; give the flow head weights.
    torch.nn.init.normal_(m.llm2vae.weight, std=0.05)
    return m


def _gen(model, tok, **kw):
    kw.setdefault("steps", 4)
    return ImageGenerator(model, tok, PackingConfig.tiny(), **kw)


def test_shapes_range_and_seed(model, tok):
    g = _gen(model, tok)
    a = g.generate(PROMPTS, size=(32, 48), seed=3, progress=False)
    b = g.generate(PROMPTS, size=(32, 48), seed=3, progress=False)
    c = g.generate(PROMPTS, size=(32, 48), seed=4, progress=False)
    assert [tuple(x.shape) for x in a] == [(3, 32, 48)] * 2
    assert all(x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 for x in a)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        assert not torch.allclose(x, z)
    assert tuple(g.generate(PROMPTS[:1], seed=0, progress=False)[0].shape) == (3, 64, 64)  # default size


def test_batching_does_not_change_images(model, tok):
    g = _gen(model, tok)
    together = g.generate(PROMPTS, size=(32, 32), seed=1, batch_size=2, progress=False)
    alone = g.generate(PROMPTS, size=(32, 32), seed=1, batch_size=1, progress=False)
    for x, y in zip(together, alone):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("img_scale,interval", [(None, (0.0, 1.0)), (1.5, (0.4, 1.0))])
def test_packed_branches_equal_separate_passes(model, tok, img_scale, interval):
    g = _gen(model, tok, steps=5, cfg_img_scale=img_scale, cfg_interval=interval)
    grid = g.latent_grid((32, 48))
    packing = PackingConfig.tiny()
    size = (48, 32)
    shape_only = [{"vae": torch.zeros(3, 32, 48)}]
    cond = build_packed_batch(
        [SamplePlan("gen", "c", "", size, [TextItem(tok.encode(PROMPTS[0])), ImageItem("vae", grid, True)])],
        shape_only, tok, packing)
    uncond = build_packed_batch([SamplePlan("gen", "u", "", size, [ImageItem("vae", grid, True)])],
                                shape_only, tok, packing)
    noise = g.make_noise(1, grid, seed=2)
    # Reference: the generic sampler, one pack per branch, each its own forward.
    ref = flow_euler_sample(model.velocity_fn({"cond": cond, "uncond": uncond, "img": cond}), noise, num_steps=5,
                            shift=3.0, text_scale=4.0, img_scale=img_scale or 1.0, cfg_interval=interval)
    got = g.sample_latents(PROMPTS[:1], grid, noise)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # Guidance matters: without it the result differs.
    plain = _gen(model, tok, steps=5, cfg_text_scale=1.0).sample_latents(PROMPTS[:1], grid, noise)
    assert not torch.allclose(plain, ref, atol=1e-4)


def test_one_pack_holds_cond_and_uncond(model, tok):
    g = _gen(model, tok)
    full, cond = g.build_packs(PROMPTS, (2, 2))
    assert full.sample_kind == ["gen"] * 4 and len(cond.splits) == 2
    assert [len(s) for s in full.splits] == [2, 2, 1, 1]  # caption + latent, then latent only
    assert full.vae_indexes.numel() == 4 * 4


def test_rejects_bad_sizes(model, tok):
    g = _gen(model, tok)
    with pytest.raises(ValueError, match="multiples"):
        g.generate(PROMPTS, size=(30, 32), progress=False)
    with pytest.raises(ValueError, match="position table"):
        g.generate(PROMPTS, size=(128, 32), progress=False)
    with pytest.raises(ValueError, match="single string"):
        g.generate("a cat", progress=False)


def test_tensor_to_pil():
    img = torch.stack([torch.full((2, 3), -1.0), torch.zeros(2, 3), torch.full((2, 3), 2.0)])
    pil = tensor_to_pil(img)
    assert pil.size == (3, 2) and pil.getpixel((0, 0)) == (0, 128, 255)
