"""Tokenizer: deterministic tiny BPE, round trip, special tokens, folder loading."""

import os

import pytest

from unigendet.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer, load_tokenizer


def test_deterministic_build():
    a = build_tiny_tokenizer().to_str()
    b = build_tiny_tokenizer().to_str()
    assert a == b


def test_cached_build_is_reused(tok):
    from unigendet.tokenizer import cache_dir

    folders = [f for f in os.listdir(cache_dir()) if f.startswith("tokenizer-tiny-")]
    assert len(folders) == 1
    path = os.path.join(cache_dir(), folders[0], "tokenizer.json")
    mtime = os.path.getmtime(path)
    again = load_tokenizer()
    assert os.path.getmtime(path) == mtime and again.encode("a cat") == tok.encode("a cat")
    with open(path) as f:
        assert f.read() == build_tiny_tokenizer().to_str(pretty=True)


def test_special_ids(tok):
    assert [tok.pad_id, tok.im_start_id, tok.im_end_id, tok.vision_start_id, tok.vision_end_id] == [0, 1, 2, 3, 4]
    assert 1000 <= tok.vocab_size <= 4096


@pytest.mark.parametrize(
    "text",
    [
        "This is a fake image. The picture shows a tabby cat, but a fine checkerboard pattern appears.",
        "Does the image looks real/fake?",
        "zebra 1234 ünïcödé — 漢字 !!",
        "",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.special_ids.values())


def test_specials_in_text_and_decode(tok):
    ids = [tok.im_start_id, *tok.encode("hi"), tok.im_end_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"
    assert tok.encode("<|im_start|>") == [tok.im_start_id]


def test_common_words_are_compact(tok):
    assert len(tok.encode("This is a real image.")) <= 6


def test_save_and_load_folder(tok, tmp_path):
    tok.save(str(tmp_path))
    assert os.path.isfile(tmp_path / "tokenizer.json") and os.path.isfile(tmp_path / "tokenizer_config.json")
    t2 = load_tokenizer(str(tmp_path))
    s = "a photo of a rocket on its launch pad"
    assert t2.encode(s) == tok.encode(s) and t2.vocab_size == tok.vocab_size
    assert t2.im_end_id == tok.im_end_id


def test_folder_without_specials_gets_them(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    t.add_tokens(["hello"])
    t.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path))
    ids = {loaded.pad_id, loaded.im_start_id, loaded.im_end_id, loaded.vision_start_id, loaded.vision_end_id}
    assert len(ids) == len(SPECIAL_TOKENS) and max(ids) < loaded.vocab_size


def test_bad_name():
    with pytest.raises(ValueError, match="path_or_name"):
        load_tokenizer("/nonexistent/tokenizer")


def test_qwen2_style_folder(tok, tmp_path):
    """vocab.json + merges.txt + a Qwen2 tokenizer_config load through transformers with the specials intact."""
    import json

    pytest.importorskip("transformers")
    build_tiny_tokenizer().model.save(str(tmp_path))
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
           "unk_token": None, "bos_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    q = load_tokenizer(str(tmp_path))
    assert q._hf is not None
    s = "This is a fake image. Banding."
    assert q.decode(q.encode(s)) == s
    assert q.special_ids == tok.special_ids
