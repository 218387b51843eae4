"""Readers: FakeClue / LAION formats, path safety, bad-data accounting, image mode conversion."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from unigendet.data.readers import (
    DataError,
    SkipStats,
    balance_classes,
    load_rgb,
    read_caption_folder,
    read_caption_jsonl,
    read_fakeclue,
    read_generation,
    read_laion_manifest,
)

Q = "<image>Does the image looks real/fake?"


def _rec(image, label=0, **kw):
    r = {
        "image": image,
        "label": label,
        "cate": "object",
        "conversations": [
            {"from": "human", "value": Q},
            {"from": "gpt", "value": "This is a fake image." if label == 0 else "This is a real image."},
        ],
    }
    r.update(kw)
    return r


def _png(path, size=(20, 16), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = (np.arange(size[0] * size[1] * 3) % 251).astype(np.uint8).reshape(size[1], size[0], 3)
    Image.fromarray(arr).convert(mode).save(path)


@pytest.fixture
def fakeclue(tmp_path):
    root = tmp_path / "fc"
    for name in ("a.png", "b.png", "c.png", "d.png"):
        _png(str(root / "train" / "x" / name))
    recs = [
        _rec("x/a.png", 0, width=20, height=16, confidence_score=0.9),  # unknown extra key tolerated
        _rec("x/b.png", 1),
        _rec("x/c.png", "1"),  # label as a string digit
        _rec("x/missing.png", 0),  # missing file
        _rec("/etc/passwd", 0),  # absolute path
        _rec("../outside.png", 1),  # escapes the root
        _rec("x/d.png", 2),  # bad label
        {"label": 0},  # no image
        {"image": "x/d.png", "label": 1, "conversations": [{"from": "gpt", "value": "hi"}]},  # bad conversation
    ]
    _png(str(tmp_path / "fc" / "outside.png"))
    os.makedirs(root / "data_json")
    with open(root / "data_json" / "train.json", "w") as f:
        json.dump(recs, f)
    return root


def test_fakeclue_json_array_and_skip_reasons(fakeclue):
    stats = SkipStats()
    recs = read_fakeclue(str(fakeclue), "train", stats=stats)
    assert [os.path.basename(r.image) for r in recs] == ["a.png", "b.png", "c.png"]
    assert [r.label for r in recs] == [0, 1, 1]
    assert recs[0].width == 20 and recs[0].height == 16 and recs[1].width is None
    assert recs[0].question == Q and recs[1].answer.startswith("This is a real image.")
    assert stats.as_dict() == {
        "missing_file": 1,
        "unsafe_path": 2,
        "bad_label": 1,
        "bad_record": 1,
        "bad_conversation": 1,
    }
    assert "unsafe_path: 2" in stats.report()


def test_fakeclue_strict_raises(fakeclue):
    with pytest.raises(DataError) as e:
        read_fakeclue(str(fakeclue), "train", strict=True)
    assert e.value.reason == "missing_file"


def test_fakeclue_jsonl(fakeclue):
    path = fakeclue / "data_json" / "train.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(_rec("x/a.png", 0)) + "\n\n" + json.dumps(_rec("x/b.png", 1)) + "\n{not json\n")
    stats = SkipStats()
    recs = read_fakeclue(str(fakeclue), "train", json_path=str(path), stats=stats)
    assert len(recs) == 2 and stats.as_dict() == {"bad_record": 1}


def test_balance_is_seeded_and_balanced(fakeclue):
    recs = read_fakeclue(str(fakeclue), "train")  # 1 fake, 2 real
    b1, b2 = balance_classes(recs, 42), balance_classes(recs, 42)
    assert b1 == b2 and sorted(r.label for r in b1) == [0, 1]
    assert len(read_fakeclue(str(fakeclue), "train", balance=True)) == 2


def test_laion_manifest_pairs_and_folder(tmp_path):
    _png(str(tmp_path / "images" / "0.png"))
    _png(str(tmp_path / "images" / "1.jpg"))
    man = [
        {"image_path": "images/0.png", "prompt": "a cat"},
        {"image_path": "images/1.jpg", "prompt": "a dog"},
        {"image_path": "images/2.png", "prompt": "missing"},
        {"image_path": "../x.png", "prompt": "escape"},
        {"image_path": "images/0.png"},
    ]
    with open(tmp_path / "final_metadata.json", "w") as f:
        json.dump(man, f)
    stats = SkipStats()
    recs = read_laion_manifest(str(tmp_path), stats=stats)
    assert [r.prompt for r in recs] == ["a cat", "a dog"]
    assert stats.as_dict() == {"missing_file": 1, "unsafe_path": 1, "bad_record": 1}
    assert [r.prompt for r in read_generation(str(tmp_path))] == ["a cat", "a dog"]

    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.write(json.dumps({"image": "images/0.png", "caption": "c0"}) + "\n")
        f.write(json.dumps({"image_path": "images/1.jpg", "text": "c1"}) + "\n")
    assert [r.prompt for r in read_caption_jsonl(str(tmp_path / "pairs.jsonl"))] == ["c0", "c1"]
    assert [r.prompt for r in read_generation(str(tmp_path / "pairs.jsonl"))] == ["c0", "c1"]

    folder = tmp_path / "folder"
    _png(str(folder / "a.png"))
    (folder / "a.txt").write_text("caption a\n")
    _png(str(folder / "b.png"))  # no caption
    stats = SkipStats()
    recs = read_caption_folder(str(folder), stats=stats)
    assert [r.prompt for r in recs] == ["caption a"] and stats.as_dict() == {"missing_caption": 1}


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16"])
def test_load_rgb_converts_modes(tmp_path, mode):
    path = str(tmp_path / ("img.tif" if mode == "CMYK" else "img.png"))
    if mode == "I;16":
        arr = (np.arange(12 * 10, dtype=np.uint16).reshape(10, 12) * 500).astype(np.uint16)
        Image.fromarray(arr).save(path)
    else:
        _png(path, (12, 10), mode)
    img = load_rgb(path)
    assert img is not None and img.mode == "RGB" and img.size == (12, 10)
    if mode == "I;16":  # 16-bit range mapped onto 8 bits
        assert np.asarray(img)[9, 11, 0] == (119 * 500) // 257


def test_load_rgb_skips_bad_files(tmp_path):
    stats = SkipStats()
    good = str(tmp_path / "good.png")
    _png(good, (64, 64))
    data = open(good, "rb").read()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    big = str(tmp_path / "big.png")
    _png(big, (100, 100))
    assert load_rgb(str(tmp_path / "trunc.png"), stats=stats) is None
    assert load_rgb(str(tmp_path / "empty.png"), stats=stats) is None
    assert load_rgb(str(tmp_path / "junk.png"), stats=stats) is None
    assert load_rgb(str(tmp_path / "nope.png"), stats=stats) is None
    assert load_rgb(big, max_pixels=50 * 50, stats=stats) is None
    assert load_rgb(good, stats=stats) is not None
    assert stats.as_dict() == {"corrupt_image": 2, "zero_size": 1, "missing_file": 1, "too_many_pixels": 1}
    with pytest.raises(DataError):
        load_rgb(str(tmp_path / "trunc.png"), strict=True)
    Image.fromarray(np.zeros((4, 4), np.float32)).save(str(tmp_path / "f.tif"))
    assert load_rgb(str(tmp_path / "f.tif"), stats=stats) is None
    assert stats.counts["unsupported_mode"] == 1
