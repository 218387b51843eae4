"""Loader: sharding, determinism, resumption, workers, bad data, the mix ratio in real packs, DALI parity."""

import os

import numpy as np
import pytest
import torch

from unigendet.data import build_embedded, read_fakeclue, read_generation
from unigendet.data.loader import PackedDataset, PackedLoader
from unigendet.data.packing import PackingConfig
from unigendet.data.readers import load_rgb
from unigendet.data.transforms import pil_to_tensor
from unigendet.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    old = os.environ.get("UNIGENDET_CACHE")
    os.environ["UNIGENDET_CACHE"] = str(root / "cache")
    build_embedded(str(root / "emb"), n_train=48, n_test=8, n_gen=16)
    tok = load_tokenizer("tiny")
    det = read_fakeclue(str(root / "emb" / "fakeclue"), "train")
    gen = read_generation(str(root / "emb" / "laion"))
    yield tok, det, gen, root
    if old is None:
        os.environ.pop("UNIGENDET_CACHE")
    else:
        os.environ["UNIGENDET_CACHE"] = old


CFG = PackingConfig.tiny(expected_num_tokens=300, max_num_tokens=400, max_num_tokens_per_sample=300)


def _ds(env, **kw):
    tok, det, gen, _ = env
    args = dict(seed=0, epochs=1)
    args.update(kw)
    cfg = args.pop("cfg", CFG)
    return PackedDataset(args.pop("det", det), args.pop("gen", gen), tok, cfg, **args)


def _ids(batches):
    return [i for b in batches for i in b.sample_ids]


def test_sharding_covers_every_record_once(env):
    tok, det, gen, _ = env
    seen = []
    for rank in range(2):
        seen += _ids(PackedLoader(_ds(env, rank=rank, world_size=2)))
    assert sorted(seen) == sorted([r.id for r in det] + [r.id for r in gen])


def test_workers_cover_every_record_once(env):
    tok, det, gen, _ = env
    loader = PackedLoader(_ds(env), num_workers=2, timeout=120)
    batches = list(loader)
    assert sorted(_ids(batches)) == sorted([r.id for r in det] + [r.id for r in gen])
    assert [b.pack_id[1] for b in batches] == list(range(len(batches)))  # in pack order across workers
    assert _ids(batches) == _ids(PackedLoader(_ds(env)))  # same stream as without workers
    assert batches[0].layout is not None


def test_load_records(env):
    from unigendet.data import load_records

    tok, det, gen, root = env
    d, g = load_records(str(root / "emb" / "fakeclue"), str(root / "emb" / "laion"))
    assert d == det and g == gen
    d, g = load_records(str(root / "emb" / "fakeclue"), str(root / "emb" / "laion"), split="test")
    assert len(d) == 8 and g == []


def test_pin_and_to(env):
    b = next(iter(PackedLoader(_ds(env, cfg=PackingConfig.tiny(diga=True)))))
    c = b.to("cpu")
    assert torch.equal(c.order, b.order) and c.layout is not None and len(c.vae_images) == len(b.vae_images)
    if torch.cuda.is_available():
        p = b.pin_memory()
        assert p.order.is_pinned() and p.vae_images[0].is_pinned()


def test_deterministic_order(env):
    a = list(PackedLoader(_ds(env, seed=3)))
    b = list(PackedLoader(_ds(env, seed=3)))
    c = list(PackedLoader(_ds(env, seed=4)))
    assert _ids(a) == _ids(b) and _ids(a) != _ids(c)
    for x, y in zip(a, b):
        assert torch.equal(x.vit_patches, y.vit_patches) and torch.equal(x.vae_noise_logit, y.vae_noise_logit)
        assert torch.equal(x.order, y.order) and torch.equal(x.ce_labels, y.ce_labels)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume(env, num_workers):
    full = list(PackedLoader(_ds(env, epochs=2), num_workers=num_workers, timeout=120))
    first = PackedLoader(_ds(env, epochs=2), num_workers=num_workers, timeout=120)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    del it
    second = PackedLoader(_ds(env, epochs=2), num_workers=num_workers, timeout=120)
    second.load_state_dict(state)
    tail = list(second)
    assert _ids(head) + _ids(tail) == _ids(full)
    for x, y in zip(head + tail, full):
        assert x.pack_id == y.pack_id
        assert torch.equal(x.vit_patches, y.vit_patches) and torch.equal(x.position_ids, y.position_ids)
    # the worker count may change between runs
    other = PackedLoader(_ds(env, epochs=2), num_workers=0 if num_workers else 2, timeout=120)
    other.load_state_dict(state)
    assert _ids(other) == _ids(tail)
    wrong = PackedLoader(_ds(env, seed=1))
    with pytest.raises(ValueError, match="seed"):
        wrong.load_state_dict(state)


def test_endless_mode_and_ratio(env):
    cfg = PackingConfig.tiny(expected_num_tokens=300, max_num_tokens=400, max_num_tokens_per_sample=300,
                             gen_weight=1, det_weight=5)
    loader = PackedLoader(_ds(env, epochs=None, cfg=cfg))
    kinds = []
    for i, b in enumerate(loader):
        kinds += b.sample_kind
        assert b.seq_len <= cfg.max_num_tokens
        if i == 14:
            break
    n_gen, n_det = kinds.count("gen"), kinds.count("det")
    assert n_gen > 0 and abs(n_det / n_gen - 5) < 1.0


def test_bad_images_are_skipped(env, tmp_path):
    tok, det, gen, _ = env
    import dataclasses

    bad = tmp_path / "bad.png"
    data = open(det[0].image, "rb").read()
    bad.write_bytes(data[: len(data) // 3])  # header intact, pixels truncated
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"nope")
    recs = [dataclasses.replace(det[0], id="bad", image=str(bad)), dataclasses.replace(det[1], id="junk",
                                                                                       image=str(junk))] + det[2:10]
    loader = PackedLoader(_ds(env, det=recs, gen=[]))
    ids = _ids(list(loader))
    assert "bad" not in ids and "junk" not in ids and len(ids) == 8
    assert loader.stats.counts["corrupt_image"] == 2
    with pytest.raises(ValueError):
        list(PackedLoader(_ds(env, det=recs, gen=[], strict=True)))




def _dali_ok():
    from unigendet.data.dali import dali_available

    return dali_available()


def _check_dali_against_pil(env, device_id, mean_tol, max_tol):
    """DALI decode + both resizes of six images (a batch of 4: two chunks) against the PIL/torch path."""
    from unigendet.data.dali import DaliImagePipeline

    tok, det, gen, _ = env
    recs = det[:6]
    enc = [np.fromfile(r.image, dtype=np.uint8) for r in recs]
    imgs = [load_rgb(r.image) for r in recs]
    sa = [CFG.vit.size_for(*i.size) for i in imgs]
    sb = [CFG.vae.size_for(*i.size) for i in imgs]
    a, b = DaliImagePipeline(4, num_threads=1, device_id=device_id)(enc, sa, sb)
    assert len(a) == len(b) == len(imgs)
    for x, y, im in zip(a, b, imgs):
        t = pil_to_tensor(im)
        for got, want in ((x, CFG.vit(t)), (y, CFG.vae(t))):
            assert got.shape == want.shape and got.dtype == torch.float32
            err = (got.cpu() - want).abs()
            assert err.mean() < mean_tol and err.max() < max_tol


@pytest.mark.skipif(not _dali_ok(), reason="nvidia-dali not installed")
def test_dali_pipeline_matches_pil(env):
    # different cubic kernels and uint8 rounding: small mean error, bounded max error
    _check_dali_against_pil(env, None, 0.01, 0.15)


@pytest.mark.gpu
@pytest.mark.skipif(not _dali_ok(), reason="nvidia-dali not installed")
def test_dali_mixed_decoding_matches_pil(env):
    """GPU decoding (``mixed``) and GPU resize; the GPU decoder and resampler differ a little more from PIL's."""
    _check_dali_against_pil(env, 0, 0.02, 0.25)


@pytest.mark.skipif(not _dali_ok(), reason="nvidia-dali not installed")
def test_dali_loader_matches_torch_loader(env, tmp_path):
    import dataclasses

    tok, det, gen, _ = env
    bad = tmp_path / "bad.png"
    data = open(det[0].image, "rb").read()
    bad.write_bytes(data[: len(data) // 3])  # decodable header, truncated pixels: DALI must skip it too
    recs = [dataclasses.replace(det[0], id="bad", image=str(bad))] + det[1:24]
    cfg = PackingConfig.tiny(diga=True)
    torch_loader = PackedLoader(_ds(env, det=recs, cfg=cfg))
    torch_batches = list(torch_loader)
    dali_loader = PackedLoader(_ds(env, det=recs, cfg=cfg), backend="dali", num_threads=1)
    dali_batches = list(dali_loader)
    assert dali_loader.backend == "dali"
    assert _ids(dali_batches) == _ids(torch_batches) and "bad" not in _ids(dali_batches)
    assert dali_loader.stats.counts["corrupt_image"] == torch_loader.stats.counts["corrupt_image"] == 1
    n_diga = 0
    for x, y in zip(dali_batches, torch_batches):
        assert torch.equal(x.order, y.order) and x.splits == y.splits
        assert (x.vit_patches - y.vit_patches).abs().mean() < 0.01
        for a, b in zip(x.vae_images, y.vae_images):
            assert a.shape == b.shape and (a - b).abs().mean() < 0.01
        assert (x.diga is None) == (y.diga is None)
        if x.diga is not None:
            n_diga += 1
            assert x.diga.splits == y.diga.splits and (x.diga.vit_patches - y.diga.vit_patches).abs().mean() < 0.01
    assert n_diga > 0


def test_works_without_dali(env):
    """With nvidia-dali unimportable, the package imports, 'auto' falls back to torch, 'dali' says why."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['nvidia.dali'] = None\n"
        "import unigendet.data as d\n"
        "from unigendet.data.dali import dali_available, dali_unavailable_reason, DaliImagePipeline\n"
        "assert not dali_available() and 'nvidia-dali' in dali_unavailable_reason()\n"
        "try:\n"
        "    DaliImagePipeline()\n"
        "    raise SystemExit('no error')\n"
        "except RuntimeError:\n"
        "    pass\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_auto_backend(env, monkeypatch):
    import unigendet.data.dali as dali_mod

    monkeypatch.setattr(dali_mod, "dali_available", lambda: False)
    assert PackedLoader(_ds(env), backend="auto").backend == "torch"
    monkeypatch.setattr(dali_mod, "dali_available", lambda: True)
    assert PackedLoader(_ds(env), backend="auto").backend == "dali"
    with pytest.raises(ValueError, match="backend"):
        PackedLoader(_ds(env), backend="cv2")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pack_sharding_splits_one_global_stream(env, num_workers):
    # shard="packs": rank r of W takes packs r, r + W, ... of the stream a single process would see, in order,
    # with any number of loader workers, and resumes mid-way exactly.
    one = list(PackedLoader(_ds(env, epochs=2)))
    ranks = [list(PackedLoader(_ds(env, epochs=2, rank=r, world_size=2, shard="packs"), num_workers=num_workers,
                               timeout=120)) for r in range(2)]
    assert [b.pack_id[1] for b in ranks[1]] == [b.pack_id[1] for b in one][1::2]
    merged = [b for pair in zip(ranks[0], ranks[1]) for b in pair] + ranks[0][len(ranks[1]):]
    assert _ids(merged) == _ids(one)
    for x, y in zip(merged, one):
        assert torch.equal(x.vit_patches, y.vit_patches) and torch.equal(x.position_ids, y.position_ids)
    first = PackedLoader(_ds(env, epochs=2, rank=1, world_size=2, shard="packs"), num_workers=num_workers, timeout=120)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state["next_pack"] == head[-1].pack_id[1] + 2 and state["shard"] == "packs"
    del it
    second = PackedLoader(_ds(env, epochs=2, rank=1, world_size=2, shard="packs"))
    second.load_state_dict(state)
    assert _ids(head) + _ids(second) == _ids(ranks[1])
    with pytest.raises(ValueError, match="shard"):
        PackedLoader(_ds(env, epochs=2, rank=1, world_size=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="shard"):
        _ds(env, shard="samples")
