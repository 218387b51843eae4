"""Data pipeline benchmarks.

* ``decode``: images/s of decode + both NaViT resizes + normalisation, DALI CPU pipeline (and, on a GPU, DALI
  ``mixed`` decoding) vs a PyTorch DataLoader (PIL decode, torch resize) with the same number of CPU
  threads/workers, on the embedded data set's small PNGs (tiny sizes) and on the bundled full-size photos
  re-encoded as JPEG (BAGEL sizes).
* ``packing``: the share of real tokens in token-budgeted packs, against padding every sample of the same packs
  to the longest sample and against padding every pack to ``max_num_tokens`` (``extra_info``).

Run: ``pytest benchmarks/bench_data.py --benchmark-only``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import run_pedantic
from PIL import Image

from unigendet.data import build_embedded, read_fakeclue, read_generation
from unigendet.data.dali import dali_available
from unigendet.data.embedded import SOURCES, _source_path
from unigendet.data.loader import PackedDataset
from unigendet.data.packing import PackingConfig
from unigendet.data.readers import SkipStats, load_rgb
from unigendet.data.transforms import pil_to_tensor
from unigendet.tokenizer import load_tokenizer

THREADS = max(1, min(4, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data")
    os.environ.setdefault("UNIGENDET_CACHE", str(root / "cache"))
    build_embedded(str(root / "emb"), n_train=256, n_test=8, n_gen=128)
    small = [r.image for r in read_fakeclue(str(root / "emb" / "fakeclue"), "train")[:64]]
    big = []
    for s in SOURCES[:8]:
        path = str(root / f"{s.name}.jpg")
        with Image.open(_source_path(s)) as im:
            im.convert("RGB").save(path, quality=90)
        big.append(path)
    return {"root": root, "small": small, "big": big}


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths, cfg):
        self.paths, self.cfg = paths, cfg

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        x = pil_to_tensor(load_rgb(self.paths[i], stats=SkipStats()))
        return self.cfg.vit(x), self.cfg.vae(x)


def _cfg(kind):
    return PackingConfig.tiny() if kind == "small" else PackingConfig.bagel()


@pytest.mark.benchmark(group="data-decode")
@pytest.mark.parametrize("images", ["small", "big"])
@pytest.mark.parametrize("provider", ["torch-dataloader", "dali-cpu", "dali-mixed"])
def test_decode_throughput(benchmark, data, provider, images):
    paths = data[images]
    cfg = _cfg(images)
    device = "cpu"
    if provider.startswith("dali"):
        if not dali_available():
            pytest.skip("nvidia-dali not installed")
        if provider == "dali-mixed" and not torch.cuda.is_available():
            pytest.skip("dali-mixed decodes on a GPU: needs CUDA")
        from unigendet.data.dali import DaliImagePipeline

        device_id = 0 if provider == "dali-mixed" else None
        device = "cuda" if device_id is not None else "cpu"
        pipe = DaliImagePipeline(max_batch_size=len(paths), num_threads=THREADS, device_id=device_id)
        enc = [np.fromfile(p, dtype=np.uint8) for p in paths]
        sizes = []
        for p in paths:
            with Image.open(p) as im:
                sizes.append(im.size)
        sa = [cfg.vit.size_for(*s) for s in sizes]
        sb = [cfg.vae.size_for(*s) for s in sizes]

        def fn():
            return pipe(enc, sa, sb)
    else:
        loader = torch.utils.data.DataLoader(
            _Decode(paths, cfg), batch_size=None, num_workers=THREADS, persistent_workers=True, prefetch_factor=4
        )

        def fn():
            return [x for x in loader]

    run_pedantic(benchmark, fn, device, rounds=3, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = len(paths) / float(benchmark.stats.stats.mean)
    benchmark.extra_info["threads"] = THREADS
    benchmark.extra_info["images"] = len(paths)


@pytest.mark.benchmark(group="data-packing")
@pytest.mark.parametrize("ratio", [(1, 1), (1, 5)])
def test_packing_efficiency(benchmark, data, ratio):
    root = data["root"]
    tok = load_tokenizer("tiny")
    det = read_fakeclue(str(root / "emb" / "fakeclue"), "train")
    gen = read_generation(str(root / "emb" / "laion"))
    cfg = PackingConfig.tiny(gen_weight=ratio[0], det_weight=ratio[1])
    ds = PackedDataset(det, gen, tok, cfg, epochs=1)

    def plan_all():
        return list(ds.plan_packs(0, 1, SkipStats()))

    packs = run_pedantic(benchmark, plan_all, "cpu", rounds=3, warmup_rounds=1)
    real = sum(s.num_tokens for p in packs for s in p)
    padded_longest = sum(len(p) * max(s.num_tokens for s in p) for p in packs)
    benchmark.extra_info["packs"] = len(packs)
    benchmark.extra_info["real_token_share_packed"] = 1.0
    benchmark.extra_info["real_token_share_pad_to_longest"] = real / padded_longest
    benchmark.extra_info["real_token_share_pad_to_max_num_tokens"] = real / (len(packs) * cfg.max_num_tokens)
    benchmark.extra_info["mean_pack_tokens"] = real / len(packs)
