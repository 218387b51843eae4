"""Tokenizers: a Qwen2 tokenizer folder (through ``transformers``), or ``"tiny"``, a small byte-level BPE.

The tiny tokenizer is trained deterministically with the ``tokenizers`` library on text the project builds itself
(the explanations, captions and prompts of the embedded data set plus a fixed English text), so it needs no
download and is identical on every machine. It is cached as ``tokenizer.json`` under
``$UNIGENDET_CACHE`` (default ``~/.cache/unigendet``) in a folder named after a hash of its corpus and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "build_tiny_tokenizer", "cache_dir", "load_tokenizer"]

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
# Order fixes the ids of the tiny tokenizer: 0 .. 4.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END)
TINY_VOCAB_SIZE = 2048
_TINY_VERSION = 1
_TINY_MIN_FREQUENCY = 1


def cache_dir() -> str:
    """``$UNIGENDET_CACHE`` or ``~/.cache/unigendet``."""
    return os.environ.get("UNIGENDET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unigendet")


class Tokenizer:
    """Uniform wrapper over a ``tokenizers.Tokenizer`` or a ``transformers`` fast tokenizer.

    ``encode`` adds no special tokens; the five special ids are attributes; ``vocab_size`` bounds every id.
    """

    def __init__(self, backend, *, hf=None):
        self._tok = backend  # tokenizers.Tokenizer
        self._hf = hf  # transformers tokenizer, if loaded from a folder
        ids = {}
        for t in SPECIAL_TOKENS:
            i = backend.token_to_id(t)
            if i is None:
                raise ValueError(f"tokenizer lacks special token {t!r}")
            ids[t] = i
        self.pad_id = ids[PAD_TOKEN]
        self.im_start_id = ids[IM_START]
        self.im_end_id = ids[IM_END]
        self.vision_start_id = ids[VISION_START]
        self.vision_end_id = ids[VISION_END]
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        return {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special tokens added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, folder: str) -> None:
        """Write ``tokenizer.json`` and a minimal ``tokenizer_config.json`` into ``folder``."""
        os.makedirs(folder, exist_ok=True)
        self._tok.save(os.path.join(folder, "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": IM_END,
            "pad_token": PAD_TOKEN,
            "additional_special_tokens": [IM_START, IM_END, VISION_START, VISION_END],
            "model_max_length": 32768,
        }
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)

    def __len__(self) -> int:
        return self.vocab_size


# --------------------------------------------------------------------------------------------------
# The tiny tokenizer
# --------------------------------------------------------------------------------------------------

# Fixed English text: general vocabulary so that prompts outside the embedded data set still tokenize into
# reasonably sized pieces.
_FIXED_TEXT = """\
Does the image look real or fake? Look closely at the picture and explain your answer.
This is a real image. This is a fake image. The photograph was taken with a camera.
The picture shows a person, an animal, an object or a scene, indoors or outdoors, by day or at night.
A forensic image analyst looks for visual evidence of authenticity: natural sensor noise, consistent lighting,
coherent shadows, sharp and continuous edges, smooth colour gradients and plausible textures.
Generated images often show repeated patterns, checkerboard artefacts, blocky seams, colour banding,
over-smoothed skin, waxy surfaces, blurred details, jagged edges, aliasing and inconsistent reflections.
Please describe the image in one sentence. Generate an image of the following description.
A photo of a cat sitting on a sofa. A cup of coffee on a wooden table. A rocket on the launch pad.
An astronaut in a white suit in front of a flag. A red motorcycle parked in a garage.
A portrait of a woman in a uniform. A Chinese temple with a green roof. A flower with yellow petals.
Stars and galaxies in the deep sky. A close-up of the retina of an eye. Cells under a microscope.
The quick brown fox jumps over the lazy dog. One, two, three, four, five, six, seven, eight, nine, ten.
The left side, the right side, the top, the bottom, the centre and the corners of the frame.
Colours: red, green, blue, yellow, orange, purple, pink, brown, black, white, grey, gold and silver.
The texture is rough, fine, grainy, soft, detailed, uniform, noisy, clean, sharp, blurry or flat.
In summary, the evidence suggests that the image was produced by a generative model rather than a camera.
In summary, the details are consistent with a genuine photograph and show no signs of synthesis.
A man walks his dog along the beach at sunset while waves break on the sand and gulls circle overhead.
Two children play football in a park; behind them, tall trees, a small lake and a wooden bridge.
A busy street in the city centre with cars, buses, bicycles, shops, traffic lights and people crossing.
A bowl of fresh fruit: apples, bananas, oranges, grapes and strawberries on a kitchen counter.
Snow-covered mountains rise above a quiet valley with a river, green fields and a village church.
An old woman smiles at the camera, her face lined with wrinkles, wearing glasses and a knitted scarf.
A close-up of a bird perched on a branch, its feathers brown and white, its eye bright and alert.
A modern building of glass and steel reflects the clouds; the windows form a regular grid.
A plate of pasta with tomato sauce, basil leaves and grated cheese, served in a small restaurant.
A horse grazes in a meadow full of flowers under a blue sky with a few white clouds.
The lighting comes from a window on the left, casting soft shadows to the right of every object.
Highlights on metal and glass, reflections in the water and the shading of faces should all agree.
Hair, fur, grass and fabric contain fine strands and fibres that generators often merge or smear.
Text and letters on signs, labels and screens are frequently garbled in synthetic images.
Hands with extra or missing fingers, mismatched earrings and asymmetric eyes are common mistakes.
Backgrounds may melt into strange shapes, and straight lines such as railings may bend or break.
Compression, resizing and noise can hide traces, so an analyst looks at several kinds of evidence.
Satellite images show roads, rivers, fields and roofs seen from above; documents show printed pages.
Faces in videos may be swapped: check the boundary of the face, the skin tone and the blinking.
The answer starts with a verdict, real or fake, and then explains which details support it.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday; morning, afternoon, evening, night.
January, February, March, April, May, June, July, August, September, October, November, December.
Large, small, tall, short, wide, narrow, near, far, above, below, inside, outside, between, behind.
"""


def _tiny_corpus() -> list[str]:
    from unigendet.data.embedded import text_corpus

    return [*_FIXED_TEXT.splitlines(), *text_corpus()]


def _corpus_hash(lines: list[str], vocab_size: int) -> str:
    h = hashlib.sha256()
    h.update(f"v{_TINY_VERSION}|{vocab_size}|{_TINY_MIN_FREQUENCY}|{'|'.join(SPECIAL_TOKENS)}\n".encode())
    for line in lines:
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


def build_tiny_tokenizer(lines: list[str] | None = None, vocab_size: int = TINY_VOCAB_SIZE):
    """Train the byte-level BPE (a ``tokenizers.Tokenizer``) on ``lines`` (default: the project corpus).

    Deterministic: the trainer sees the lines in a fixed order and BPE merges break ties by pair order, so two
    builds produce byte-identical ``tokenizer.json`` files.
    """
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    lines = _tiny_corpus() if lines is None else lines
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=_TINY_MIN_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return tok


def _load_tiny(vocab_size: int = TINY_VOCAB_SIZE) -> Tokenizer:
    from tokenizers import Tokenizer as _Tok

    lines = _tiny_corpus()
    folder = os.path.join(cache_dir(), f"tokenizer-tiny-{_corpus_hash(lines, vocab_size)}")
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        tok = Tokenizer(build_tiny_tokenizer(lines, vocab_size))
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=os.path.dirname(folder))
        tok.save(tmp)
        try:
            os.replace(tmp, folder)  # atomic: concurrent builders produce the same files
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its files are identical
    return Tokenizer(_Tok.from_file(path))


def _load_folder(folder: str) -> Tokenizer:
    """A Qwen2 tokenizer folder, loaded offline through transformers, with the four special tokens ensured."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        missing = [t for t in SPECIAL_TOKENS if hf.convert_tokens_to_ids(t) in (None, hf.unk_token_id)]
        if missing:
            hf.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        backend = hf.backend_tokenizer
        return Tokenizer(backend, hf=hf)
    except Exception:
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise
    # Fall back to the raw tokenizer.json (e.g. a transformers version that cannot read the config).
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as _Tok

    tok = _Tok.from_file(path)
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return Tokenizer(tok)


def load_tokenizer(path_or_name: str | None = None) -> Tokenizer:
    """``None`` / ``"tiny"``: the built-in byte-level BPE; a folder: a Qwen2 (or any fast) tokenizer."""
    if path_or_name in (None, "tiny"):
        return _load_tiny()
    if os.path.isdir(path_or_name):
        return _load_folder(path_or_name)
    if os.path.isfile(path_or_name) and path_or_name.endswith(".json"):
        from tokenizers import Tokenizer as _Tok

        return Tokenizer(_Tok.from_file(path_or_name))
    raise ValueError(f"path_or_name must be 'tiny', a tokenizer folder or a tokenizer.json, got {path_or_name!r}")
