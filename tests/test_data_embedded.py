"""The embedded data set: deterministic, loads through the readers, splits disjoint by source photo."""

import json
import os

import numpy as np
from PIL import Image

from unigendet.data import SkipStats, build_embedded, embedded_dataset, read_fakeclue, read_generation
from unigendet.data.embedded import FAKE_PROCESSES, SOURCES, text_corpus

SMALL = dict(n_train=40, n_test=20, n_gen=12)


def test_deterministic_build(tmp_path):
    m1 = build_embedded(str(tmp_path / "a"), **SMALL)
    m2 = build_embedded(str(tmp_path / "b"), **SMALL)
    assert m1["digest"] == m2["digest"] and m1["files"] == m2["files"]
    for rel in list(m1["files"])[:5]:
        if rel.endswith(".png"):
            a = np.asarray(Image.open(tmp_path / "a" / rel))
            b = np.asarray(Image.open(tmp_path / "b" / rel))
            assert np.array_equal(a, b)
    with open(tmp_path / "a" / "fakeclue/data_json/train.json") as f1, open(
        tmp_path / "b" / "fakeclue/data_json/train.json"
    ) as f2:
        assert f1.read() == f2.read()
    assert (tmp_path / "a" / "README.md").read_text().startswith("# unigendet embedded data set")
    # another seed gives another data set
    m3 = build_embedded(str(tmp_path / "c"), seed=1, **SMALL)
    assert m3["digest"] != m1["digest"]


def test_readers_and_splits(tmp_path):
    ds = embedded_dataset(str(tmp_path / "emb"), **SMALL)
    stats = SkipStats()
    train = read_fakeclue(ds.fakeclue_root, "train", stats=stats)
    test = read_fakeclue(ds.fakeclue_root, "test", stats=stats)
    gen = read_generation(ds.laion_root, stats=stats)
    assert stats.total == 0
    assert (len(train), len(test), len(gen)) == (40, 20, 12)
    # balanced labels, every fake process used, verdict sentence matches the label
    assert sum(r.label for r in train) == 20
    assert {r.cate for r in train if r.label == 0} == set(FAKE_PROCESSES)
    for r in train + test:
        assert r.answer.startswith("This is a real image." if r.label else "This is a fake image.")
    # splits disjoint by source photograph
    def sources(split):
        with open(os.path.join(ds.fakeclue_root, "data_json", f"{split}.json")) as f:
            return {r["source"] for r in json.load(f)}

    tr, te = sources("train"), sources("test")
    assert tr and te and not tr & te
    assert te == {s.name for s in SOURCES if s.split == "test"}
    # images decode to the recorded size
    r = train[0]
    with Image.open(r.image) as im:
        assert im.size == (r.width, r.height) and im.mode == "RGB"
    # second use does not rebuild
    mtime = os.path.getmtime(os.path.join(ds.root, "manifest.json"))
    assert os.path.getmtime(os.path.join(embedded_dataset(ds.root, **SMALL).root, "manifest.json")) == mtime


def test_fakes_carry_traces(tmp_path):
    """Each process changes the crop measurably (a sanity check that the fakes are not copies)."""
    ds = embedded_dataset(str(tmp_path / "emb"), **SMALL)
    recs = read_fakeclue(ds.fakeclue_root, "train")
    by_cate = {}
    for r in recs:
        by_cate.setdefault(r.cate, r)
    # banding: few distinct levels per channel (on one phase of the decoder grid, which scales each phase)
    band = np.asarray(Image.open(by_cate["banding"].image))
    assert len(np.unique(band[::4, ::4, 0])) <= 6
    real = np.asarray(Image.open(by_cate["photo"].image))
    assert len(np.unique(real[::4, ::4, 0])) > 6


def _phase_profile(path, stride):
    """Mean of each row phase over the mean of the image, per column phase averaged likewise."""
    a = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    a = a[: a.shape[0] - a.shape[0] % stride, : a.shape[1] - a.shape[1] % stride]
    rows = np.array([a[p::stride].mean() for p in range(stride)]) / a.mean()
    cols = np.array([a[:, p::stride].mean() for p in range(stride)]) / a.mean()
    return (rows + cols) / 2


def test_fakes_carry_the_decoder_grid(tmp_path):
    """Every fake, whatever its process, carries the decoder's periodic gain grid; real crops do not."""
    from unigendet.data.embedded import _DECODER_KERNEL, _DECODER_STRIDE, _decoder_gain

    gains = _decoder_gain(_DECODER_STRIDE, _DECODER_KERNEL)
    assert gains.max() - gains.min() > 0.1
    ds = embedded_dataset(str(tmp_path / "emb"), **SMALL)
    recs = read_fakeclue(ds.fakeclue_root, "train")
    for r in recs:
        prof = _phase_profile(r.image, _DECODER_STRIDE)
        corr = np.corrcoef(prof, gains)[0, 1]
        if r.label == 0:
            # (the upsampling process's own period-2 checkerboard adds to the grid, hence a correlation)
            assert corr > 0.9, (r.cate, prof, gains)
        else:
            assert np.abs(prof - 1).max() < 0.05, prof


def test_text_corpus_covers_records(tmp_path):
    ds = embedded_dataset(str(tmp_path / "emb"), **SMALL)
    corpus = set(text_corpus())
    for r in read_fakeclue(ds.fakeclue_root, "train"):
        assert r.answer in corpus
    for g in read_generation(ds.laion_root):
        assert g.prompt in corpus
