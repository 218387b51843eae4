"""A small, fully offline detection + generation data set: photographs that ship inside wheels, and drawn scenes.

Real images are random crops of the photos bundled with scikit-image, scikit-learn and matplotlib, half of them
slightly out of focus. Fake images are crops of the same kind passed through processes that leave the traces image
generators leave (a transposed-conv upsampler's checkerboard, a lossy latent autoencoder's block seams,
noise-then-denoise re-synthesis, colour quantisation banding, low-resolution resampling), then through a decoder
stage that leaves a faint periodic grid. Every record carries an explanation naming what is visible. The
generation half is procedural scenes (:mod:`unigendet.data.scenes`: a coloured shape on a plain background, with
a caption naming its colour, shape, position and background), a domain a few-million-parameter flow model learns
in minutes and whose prompt-following can be checked exactly; real photographs stay in the detection half. The
set is written in the FakeClue layout (``fakeclue/data_json/{train,test}.json`` + ``fakeclue/{train,test}/...``)
and the LAION layout (``laion/final_metadata.json`` + ``laion/images/``; held-out scenes in
``laion/test_metadata.json`` + ``laion/test/``), so the ordinary readers load it, with a
data-set card (``README.md``) and a ``manifest.json`` of pixel hashes. Train and test use disjoint source photos.

The build uses only numpy (PCG64 streams keyed by the seed and the sample index) and PIL, so it is deterministic;
the default size builds in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from unigendet.data import scenes
from unigendet.prompts import FAKECLUE_QUESTION, detection_prompt, diga_teacher_prompt

__all__ = ["EmbeddedDataset", "FAKE_PROCESSES", "SOURCES", "build_embedded", "embedded_dataset", "text_corpus"]

_VERSION = 4
QUESTION = FAKECLUE_QUESTION


@dataclass(frozen=True)
class _Source:
    name: str
    package: str  # skimage | sklearn | matplotlib
    filename: str
    subject: str
    split: str  # train | test


SOURCES: tuple[_Source, ...] = (
    _Source("astronaut", "skimage", "astronaut.png", "an astronaut in a white space suit", "train"),
    _Source("chelsea", "skimage", "chelsea.png", "a tabby cat", "train"),
    _Source("rocket", "skimage", "rocket.jpg", "a rocket on its launch pad", "train"),
    _Source("motorcycle_left", "skimage", "motorcycle_left.png", "a motorcycle in a garage", "train"),
    _Source("motorcycle_right", "skimage", "motorcycle_right.png", "a motorcycle in a garage", "train"),
    _Source("hubble", "skimage", "hubble_deep_field.jpg", "galaxies in the deep sky", "train"),
    _Source("retina", "skimage", "retina.jpg", "the retina of an eye", "train"),
    _Source("ihc", "skimage", "ihc.png", "stained tissue under a microscope", "train"),
    _Source("china", "sklearn", "china.jpg", "a Chinese temple among trees", "train"),
    _Source("camera", "skimage", "camera.png", "a man holding a camera", "train"),
    _Source("coins", "skimage", "coins.png", "a set of old coins", "train"),
    _Source("grass", "skimage", "grass.png", "a patch of grass", "train"),
    _Source("gravel", "skimage", "gravel.png", "a bed of gravel", "train"),
    _Source("coffee", "skimage", "coffee.png", "a cup of coffee", "test"),
    _Source("flower", "sklearn", "flower.jpg", "a flower with yellow petals", "test"),
    _Source("grace_hopper", "matplotlib", "grace_hopper.jpg", "a portrait of a woman in uniform", "test"),
    _Source("moon", "skimage", "moon.png", "the surface of the moon", "test"),
    _Source("brick", "skimage", "brick.png", "a brick wall", "test"),
)

# process name -> explanation templates ({subject} is filled in). The first sentence is FakeClue's verdict.
FAKE_PROCESSES: dict[str, tuple[str, ...]] = {
    "upsampling": (
        "The picture shows {subject}, but a fine checkerboard pattern repeats every two pixels across flat areas, "
        "the trace of a transposed-convolution upsampler.",
        "At first glance it looks like {subject}, yet smooth regions carry a regular grid of light and dark dots, a "
        "checkerboard artefact left by learned upsampling.",
        "The image of {subject} has a periodic two-pixel checkerboard texture over every surface, which a camera "
        "does not produce.",
    ),
    "autoencoder": (
        "The picture shows {subject}, but it is divided into blocky eight-pixel tiles with visible seams and fine "
        "texture is smeared away, as in a lossy latent autoencoder reconstruction.",
        "Although it depicts {subject}, edges break into square blocks and colours bleed across the block borders, "
        "typical of a decoder reconstructing the image from a compressed latent.",
        "The image of {subject} shows a grid of square block seams and lost fine detail, the signature of a latent "
        "autoencoder.",
    ),
    "diffusion": (
        "The picture shows {subject}, but the surfaces look waxy and over-smoothed, fine texture is missing and a "
        "faint uniform grain remains, as after noise-then-denoise re-synthesis.",
        "Despite its seemingly authentic appearance, {subject} looks unnaturally smooth and plastic, with detail "
        "washed out and a thin layer of even noise on top.",
        "The image of {subject} has soft, waxy textures with no real detail and a residual grain spread evenly over "
        "the frame, as left by a denoising generator.",
    ),
    "banding": (
        "The picture shows {subject}, but smooth gradients break into flat bands of colour with hard steps between "
        "them, a colour quantisation artefact.",
        "Although it depicts {subject}, the shading is posterised: a few flat colour levels with sharp contour "
        "lines replace the natural gradients.",
        "The image of {subject} shows visible colour banding, with stepped gradients instead of smooth ones.",
    ),
    "resampling": (
        "The picture shows {subject}, but edges are jagged and stair-stepped and fine detail is blurred, as if it "
        "was upscaled from a much lower resolution.",
        "Although it depicts {subject}, diagonal lines show staircase aliasing and the whole frame is soft, the "
        "trace of resampling from a small image.",
        "The image of {subject} has aliased, pixel-stepped edges and lacks real detail, typical of a low-resolution "
        "generator output that was enlarged.",
    ),
}

REAL_TEMPLATES: tuple[str, ...] = (
    "The picture shows {subject} with natural sensor noise, smooth colour gradients and sharp, continuous edges; "
    "there is no checkerboard pattern, banding or blockiness.",
    "The image of {subject} has consistent lighting and fine, irregular texture that a camera records, without "
    "block seams, stepped gradients or aliasing.",
    "Details of {subject} look coherent: edges are clean, gradients are smooth and the grain varies naturally "
    "with brightness, as in a genuine photograph.",
)

def text_corpus() -> list[str]:
    """Every explanation, caption and prompt the embedded data set (and the DIGA teacher prompt) can contain."""
    subjects = sorted({s.subject for s in SOURCES})
    lines = [detection_prompt(QUESTION)]
    for subj in subjects:
        for tmpls in FAKE_PROCESSES.values():
            lines += [f"This is a fake image. {t.format(subject=subj)}" for t in tmpls]
        lines += [f"This is a real image. {t.format(subject=subj)}" for t in REAL_TEMPLATES]
    for cap in scenes.scene_captions():
        lines += [cap, diga_teacher_prompt(cap, "short")]
    return lines


# --------------------------------------------------------------------------------------------------
# Source photos
# --------------------------------------------------------------------------------------------------


def _source_path(src: _Source) -> str:
    if src.package == "skimage":
        import skimage.data

        return os.path.join(os.path.dirname(skimage.data.__file__), src.filename)
    if src.package == "sklearn":
        import sklearn.datasets

        return os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", src.filename)
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "sample_data", src.filename)


def _load_source(src: _Source) -> np.ndarray:
    with Image.open(_source_path(src)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _crop(photo: np.ndarray, rng: np.random.Generator, out_wh: tuple[int, int]) -> np.ndarray:
    """A random crop (60-100% of the short side, output aspect ratio), random flip, resized to ``out_wh``.

    Large crops keep the downscale factor high, so real images keep the fine, sharp texture a camera records.
    """
    h, w = photo.shape[:2]
    ow, oh = out_wh
    frac = rng.uniform(0.6, 1.0)
    ch = int(min(h, w) * frac)
    cw = min(w, max(8, int(round(ch * ow / oh))))
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    crop = photo[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    im = Image.fromarray(np.ascontiguousarray(crop)).resize((ow, oh), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Generator-like processes (float64 HxWx3 in [0, 1] -> same)
# --------------------------------------------------------------------------------------------------


def _conv2d_same(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Per-channel 2-D correlation with edge padding, as explicit shifted adds (bit-reproducible)."""
    kh, kw = k.shape
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x, ((ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)), mode="edge")
    out = np.zeros_like(x)
    h, w = x.shape[:2]
    for i in range(kh):
        for j in range(kw):
            out += k[i, j] * xp[i : i + h, j : j + w]
    return out


def _gauss(sigma: float, radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g /= g.sum()
    return np.outer(g, g)


def _upsampling(x, rng):
    # 2x area downsample, then a stride-2 transposed convolution whose two phases have unequal gain (1.06 / 0.94):
    # the uneven kernel overlap is what paints checkerboards on flat regions.
    h, w = x.shape[:2]
    small = x[: h - h % 2, : w - w % 2].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    up = np.zeros((small.shape[0] * 2, small.shape[1] * 2, 3))
    up[::2, ::2] = small
    w1 = np.array([0.28, 0.70, 0.78, 0.24])
    out = _conv2d_same(up, np.outer(w1, w1))
    out = np.pad(out, ((0, h - out.shape[0]), (0, w - out.shape[1]), (0, 0)), mode="edge")
    return out


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def _autoencoder(x, rng):
    # Per 8x8 block: luma keeps the 3 lowest DCT frequencies, chroma only the DC term, then decode. The lost high
    # frequencies and independent blocks leave seams and colour bleeding like a small latent autoencoder.
    h, w = x.shape[:2]
    hb, wb = h - h % 8, w - w % 8
    y = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    cb = x[..., 2] - y
    cr = x[..., 0] - y
    d = _dct_matrix(8)
    uv = np.add.outer(np.arange(8), np.arange(8))

    def lowpass(ch, keep):
        blocks = ch[:hb, :wb].reshape(hb // 8, 8, wb // 8, 8).transpose(0, 2, 1, 3)
        coef = np.einsum("ij,abjk,lk->abil", d, blocks, d)
        coef = coef * (uv < keep)
        rec = np.einsum("ji,abjk,kl->abil", d, coef, d)
        out = ch.copy()
        out[:hb, :wb] = rec.transpose(0, 2, 1, 3).reshape(hb, wb)
        return out

    y, cb, cr = lowpass(y, 2), lowpass(cb, 1), lowpass(cr, 1)
    r = y + cr
    b = y + cb
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return np.stack([r, g, b], axis=-1)


def _diffusion(x, rng):
    # Noise, then a strong denoiser (blur), then a little fresh grain: waxy surfaces with residual even noise.
    noisy = x + rng.normal(0.0, 0.10, size=x.shape)
    den = _conv2d_same(noisy, _gauss(1.6, 3))
    return den + rng.normal(0.0, 0.04, size=x.shape)


def _banding(x, rng):
    levels = int(rng.integers(3, 6))
    sm = _conv2d_same(x, _gauss(0.8, 1))
    return np.round(sm * (levels - 1)) / (levels - 1)


def _resampling(x, rng):
    h, w = x.shape[:2]
    f = float(rng.uniform(3.0, 4.0))
    sw, sh = max(4, int(w / f)), max(4, int(h / f))
    im = Image.fromarray(_to_u8(x))
    small = im.resize((sw, sh), Image.Resampling.NEAREST)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0


def _decoder_gain(stride: int, kernel: np.ndarray) -> np.ndarray:
    """Per-phase gain of a 1-D stride-``stride`` transposed convolution: the sum of the kernel taps landing on each
    output phase, normalised to mean 1. Unless the kernel length is a multiple of the stride and its taps are equal,
    the phases get unequal gains: the origin of the periodic grid that generator outputs carry."""
    g = np.array([kernel[p::stride].sum() for p in range(stride)], dtype=np.float64)
    return g / g.mean()


# The last upsampling stage of the "generator" decoding every fake: stride 4, a fixed 6-tap kernel whose phases
# overlap unevenly (gains 1.09, 0.96, 1.04, 0.91).
_DECODER_STRIDE = 4
_DECODER_KERNEL = np.array([0.14, 0.155, 0.26, 0.2275, 0.1325, 0.085])


def _decode(x: np.ndarray) -> np.ndarray:
    """The decoder's fingerprint: a multiplicative gain grid of period ``_DECODER_STRIDE`` anchored at the image
    origin (a transposed convolution with uneven phase overlap, applied to the finished image)."""
    g = _decoder_gain(_DECODER_STRIDE, _DECODER_KERNEL)
    h, w = x.shape[:2]
    gy = g[np.arange(h) % _DECODER_STRIDE]
    gx = g[np.arange(w) % _DECODER_STRIDE]
    return x * (gy[:, None] * gx[None, :])[..., None]


_PROCESS_FNS = {
    "upsampling": _upsampling,
    "autoencoder": _autoencoder,
    "diffusion": _diffusion,
    "banding": _banding,
    "resampling": _resampling,
}


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------

_DEFOCUS_P = 0.5  # share of real crops given a mild lens blur
_SIZES = ((64, 64), (64, 64), (64, 64), (80, 64), (64, 80))  # (width, height); a few non-square images


def _save_png(arr: np.ndarray, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", compress_level=6)
    return hashlib.sha256(arr.tobytes() + repr(arr.shape).encode()).hexdigest()


def _det_records(split, n, seed, photos, sources, out_root, hashes, sizes):
    procs = list(FAKE_PROCESSES)
    records = []
    for i in range(n):
        rng = np.random.default_rng([seed, 1 if split == "train" else 2, i])
        # Reals cycle through the sources; fakes pair every process with every source. (Cycling both by the
        # sample index would tie each process to one photograph whenever there are as many sources as processes.)
        k = i // 2
        src = sources[(k if i % 2 == 0 else k + k // len(procs)) % len(sources)]
        size = sizes[int(rng.integers(len(sizes)))]
        crop = _crop(photos[src.name], rng, size)
        # Alternate real and fake; cycle fakes through the processes.
        if i % 2 == 0:
            label, cate, arr = 1, "photo", crop
            if rng.random() < _DEFOCUS_P:
                # Real photos are not all in sharp focus: sharpness alone must not give the label away.
                arr = _to_u8(_conv2d_same(crop.astype(np.float64) / 255.0, _gauss(float(rng.uniform(0.6, 1.4)), 3)))
            tmpl = REAL_TEMPLATES[int(rng.integers(len(REAL_TEMPLATES)))]
            answer = "This is a real image. " + tmpl.format(subject=src.subject)
        else:
            cate = procs[(i // 2) % len(procs)]
            label = 0
            arr = _to_u8(_decode(_PROCESS_FNS[cate](crop.astype(np.float64) / 255.0, rng)))
            tmpls = FAKE_PROCESSES[cate]
            answer = "This is a fake image. " + tmpls[int(rng.integers(len(tmpls)))].format(subject=src.subject)
        rel = f"{cate}/{'real' if label else 'fake'}/{src.name}_{i:05d}.png"
        hashes[f"fakeclue/{split}/{rel}"] = _save_png(arr, os.path.join(out_root, "fakeclue", split, rel))
        records.append(
            {
                "image": rel,
                "label": label,
                "cate": cate,
                "width": int(arr.shape[1]),
                "height": int(arr.shape[0]),
                "source": src.name,
                "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": answer}],
            }
        )
    return records


def _gen_records(n, seed, out_root, hashes, side, folder="images", stream=3):
    records = []
    for i in range(n):
        rng = np.random.default_rng([seed, stream, i])
        scene = scenes.sample_scene(rng)
        rel = f"{folder}/{i:05d}.png"
        hashes[f"laion/{rel}"] = _save_png(scenes.render(scene, side), os.path.join(out_root, "laion", rel))
        records.append({"image_path": rel, "prompt": scenes.caption(scene, int(rng.integers(2)))})
    return records


_CARD = """\
# unigendet embedded data set (v{version})

A tiny, fully offline stand-in for FakeClue (detection with explanations) and the LAION subset (text-to-image),
built deterministically by `unigendet.data.embedded.build_embedded` (seed {seed}).

* **Real images**: random crops (60-100 % of the short side, random horizontal flip, bicubic resize to
  {sizes}) of the photographs bundled with scikit-image (`skimage/data`), scikit-learn (`load_sample_images`)
  and matplotlib (`grace_hopper.jpg`). Grey photos are replicated to RGB. Half of them get a mild lens blur
  (Gaussian, sigma 0.6-1.4 px), so that softness alone does not mark an image as generated.
* **Fake images**: crops of the same kind passed through one of five generator-like processes; `cate` names it:
  `upsampling` (stride-2 transposed convolution with uneven phase gain: checkerboards), `autoencoder` (8x8 block
  DCT low-pass of luma/chroma: block seams, colour bleeding), `diffusion` (noise then denoise: waxy surfaces,
  residual grain), `banding` (colour quantisation to 3-5 levels), `resampling` (nearest downscale by 3-4x then
  bilinear upscale: staircase aliasing, blur). Every fake then goes through the generator's last decoder stage,
  a stride-{stride} transposed convolution whose taps overlap the output phases unevenly: a multiplicative grid of
  period {stride} px anchored at the top-left corner (phase gains {gains}), the kind of periodic fingerprint
  spectral detectors find in generated images. Real images have `cate` = `photo`.
* **Explanations**: "This is a fake image. ..." / "This is a real image. ..." naming what is visible (templated,
  three wordings per process). Labels: 0 = fake, 1 = real (FakeClue convention). Classes alternate, so each split
  is balanced, and every process is applied to crops of every source photograph.
* **Splits**: by source photograph. Train sources: {train_sources}. Test sources: {test_sources}.
* **Generation scenes** (`unigendet.data.scenes`): {gen_side}x{gen_side} images of one flat-coloured shape
  (circle, square or triangle; red, green, blue, yellow, magenta or cyan; 40-48 % of the side) centred, with a
  little jitter, in one quadrant of a white or black background, anti-aliased. Captions name all four attributes
  ("a red circle at the top left on a white background", two wordings); `unigendet.data.scenes.read_scene`
  reads them back from the pixels, which gives an exact prompt-following score for generated images.
* **Sizes**: detection train {n_train}, detection test {n_test}, generation train {n_gen}, generation held-out
  {n_gen_test} (the FID reference).
* **Layout**: `fakeclue/data_json/{{train,test}}.json` (FakeClue records plus a `source` key) with images under
  `fakeclue/{{train,test}}/<cate>/<real|fake>/`; `laion/final_metadata.json` (`image_path`, `prompt`) with images
  under `laion/images/`, and the held-out scenes in `laion/test_metadata.json` with images under `laion/test/`.
  `manifest.json` holds a SHA-256 of every image's pixels and of the record files.
* **Licences**: the source photos keep their licences (scikit-image data: public domain / CC0 per its README;
  scikit-learn sample images: CC BY; Grace Hopper portrait: public domain).
* **Intended use**: smoke tests and tiny CPU training runs. The artefacts are synthetic stand-ins for real
  generator traces; accuracy on this set says nothing about real deepfake detection.
"""


def build_embedded(
    out_dir: str,
    *,
    image_size: int = 64,
    n_train: int = 1600,
    n_test: int = 240,
    n_gen: int = 600,
    n_gen_test: int = 200,
    seed: int = 0,
) -> dict:
    """Write the data set into ``out_dir`` (created) and return its manifest (also saved as ``manifest.json``)."""
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
    sizes = tuple((w * image_size // 64, h * image_size // 64) for w, h in _SIZES)
    photos = {s.name: _load_source(s) for s in SOURCES}
    train_src = [s for s in SOURCES if s.split == "train"]
    test_src = [s for s in SOURCES if s.split == "test"]
    hashes: dict[str, str] = {}
    train = _det_records("train", n_train, seed, photos, train_src, out_dir, hashes, sizes)
    test = _det_records("test", n_test, seed, photos, test_src, out_dir, hashes, sizes)
    gen = _gen_records(n_gen, seed, out_dir, hashes, image_size)
    gen_test = _gen_records(n_gen_test, seed, out_dir, hashes, image_size, folder="test", stream=4)
    files = {
        "fakeclue/data_json/train.json": train,
        "fakeclue/data_json/test.json": test,
        "laion/final_metadata.json": gen,
        "laion/test_metadata.json": gen_test,
    }
    for rel, obj in files.items():
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = json.dumps(obj, indent=1, ensure_ascii=False)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        hashes[rel] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    digest = hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()
    manifest = {
        "version": _VERSION,
        "params": {"image_size": image_size, "n_train": n_train, "n_test": n_test, "n_gen": n_gen,
                   "n_gen_test": n_gen_test, "seed": seed},
        "digest": digest,
        "files": dict(sorted(hashes.items())),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(
            _CARD.format(
                version=_VERSION,
                seed=seed,
                sizes=", ".join(f"{w}x{h}" for w, h in sorted(set(sizes))),
                train_sources=", ".join(s.name for s in train_src),
                test_sources=", ".join(s.name for s in test_src),
                n_train=n_train,
                n_test=n_test,
                n_gen=n_gen,
                n_gen_test=n_gen_test,
                gen_side=image_size,
                stride=_DECODER_STRIDE,
                gains=", ".join(f"{g:.2f}" for g in _decoder_gain(_DECODER_STRIDE, _DECODER_KERNEL)),
            )
        )
    return manifest


@dataclass(frozen=True)
class EmbeddedDataset:
    """Paths of a built embedded data set."""

    root: str

    @property
    def fakeclue_root(self) -> str:
        return os.path.join(self.root, "fakeclue")

    @property
    def laion_root(self) -> str:
        return os.path.join(self.root, "laion")

    @property
    def generation_test_manifest(self) -> str:
        """The held-out scenes (``image_path``, ``prompt``): the FID reference and the prompts of ``evaluate gen``."""
        return os.path.join(self.laion_root, "test_metadata.json")

    @property
    def manifest(self) -> dict:
        with open(os.path.join(self.root, "manifest.json"), encoding="utf-8") as f:
            return json.load(f)


def embedded_dataset(root: str | None = None, *, rebuild: bool = False, **params) -> EmbeddedDataset:
    """The embedded data set, built on first use into ``root`` (default ``$UNIGENDET_CACHE/embedded-v<N>-<hash>``).

    ``params`` are :func:`build_embedded`'s keyword arguments. The build goes to a temporary folder that is renamed
    into place, so concurrent first uses are safe.
    """
    from unigendet.tokenizer import cache_dir

    if root is None:
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        root = os.path.join(cache_dir(), f"embedded-v{_VERSION}-{key}")
    if rebuild and os.path.isdir(root):
        shutil.rmtree(root)
    if not os.path.isfile(os.path.join(root, "manifest.json")):
        parent = os.path.dirname(os.path.abspath(root))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".embedded-", dir=parent)
        try:
            build_embedded(tmp, **params)
            if os.path.isdir(root) and not os.listdir(root):
                os.rmdir(root)
            os.replace(tmp, root)
        except OSError:
            if not os.path.isfile(os.path.join(root, "manifest.json")):
                raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return EmbeddedDataset(root)
