"""NaViT resize rule, normalisation and ViT patchify."""

import numpy as np
import pytest
import torch
from PIL import Image

from unigendet.data.transforms import ImageTransform, patchify, target_size, vae_transform, vit_transform


def _rule(w, h, mx, mn, stride, max_pixels):
    # Independent restatement of the rule for the test.
    def div(v):
        return max(stride, int(round(v / stride) * stride))

    s = max(min(mx / max(w, h), 1.0), mn / min(w, h))
    nw, nh = div(round(w * s)), div(round(h * s))
    if nw * nh > max_pixels:
        f = (max_pixels / (nw * nh)) ** 0.5
        nw, nh = div(round(nw * f)), div(round(nh * f))
    if max(nw, nh) > mx:
        f = mx / max(nw, nh)
        nw, nh = div(round(nw * f)), div(round(nh * f))
    return nw, nh


@pytest.mark.parametrize("wh", [(640, 427), (3000, 200), (100, 100), (224, 980), (4000, 4000), (13, 7), (1, 1)])
@pytest.mark.parametrize("cfg", [(980, 224, 14, 2_007_040), (1024, 512, 16, 1_806_336), (56, 28, 14, 10**9)])
def test_target_size_rule(wh, cfg):
    w, h = target_size(*wh, *cfg)
    assert (w, h) == _rule(*wh, *cfg)
    mx, mn, stride, _ = cfg
    assert w % stride == 0 and h % stride == 0 and w >= stride and h >= stride
    assert max(w, h) <= mx + stride // 2 * 2


def test_known_sizes():
    assert vit_transform().size_for(640, 427) == (644, 420)  # already within bounds: only rounded
    assert vit_transform().size_for(300, 150) == (448, 224)  # short side raised to 224
    assert vae_transform().size_for(640, 427) == (768, 512)
    assert vae_transform().size_for(4000, 3000) == (1024, 768)  # long side capped
    assert ImageTransform(56, 28, 14).size_for(80, 64) == (56, 42)


def test_transform_output_range_and_values():
    arr = np.full((30, 40, 3), 255, np.uint8)
    arr[:, :20] = 0
    t = ImageTransform(56, 28, 14)
    x = t(Image.fromarray(arr))
    assert x.shape == (3, 28, 42) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, :, :10], torch.tensor(-1.0)) and torch.allclose(x[:, :, -10:], torch.tensor(1.0))
    # Same image as a tensor gives the same result.
    y = t(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    assert torch.equal(x, y)


def test_patchify_order():
    p = 2
    img = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    out = patchify(img, p)
    assert out.shape == (6, p * p * 3)
    # patch (row 1, col 2), pixel (r, c) in patch, channel ch
    for r in range(p):
        for c in range(p):
            for ch in range(3):
                assert out[1 * 3 + 2, (r * p + c) * 3 + ch] == img[ch, 1 * p + r, 2 * p + c]
    with pytest.raises(ValueError, match="multiple"):
        patchify(torch.zeros(3, 5, 4), 2)
    with pytest.raises(ValueError, match="shape"):
        patchify(torch.zeros(4, 4), 2)


def test_bad_arguments():
    with pytest.raises(ValueError):
        target_size(0, 10, 56, 28, 14)
    with pytest.raises(ValueError):
        ImageTransform(10, 28, 14)
