"""Readers for the detection (FakeClue) and generation (LAION-style) data, and a robust image loader.

Bad data never stops a run: a record or image that cannot be used is skipped and counted by reason in a
:class:`SkipStats`; ``strict=True`` turns every skip into a :class:`DataError` instead.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DataError",
    "DetectionRecord",
    "GenerationRecord",
    "SkipStats",
    "balance_classes",
    "image_size",
    "load_rgb",
    "read_caption_folder",
    "read_caption_jsonl",
    "read_fakeclue",
    "read_generation",
    "read_laion_manifest",
    "resolve_in_root",
]

log = logging.getLogger(__name__)

# Default pixel cap for one input image (before resizing): larger files are skipped, not decoded.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(ValueError):
    """A record or image that cannot be used; raised instead of skipping when ``strict=True``."""

    def __init__(self, reason: str, ident: str, detail: str = ""):
        super().__init__(f"{reason}: {ident}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.ident = ident
        self.detail = detail

    def describe(self) -> str:
        """The problem in words, without the path: ``"no such file"``, ``"not a readable image (OSError: ...)"``."""
        text = _REASON_TEXT.get(self.reason, self.reason.replace("_", " "))
        return f"{text} ({self.detail})" if self.detail else text


_REASON_TEXT = {
    "missing_file": "no such file",
    "not_a_file": "a folder, not an image file",
    "zero_size": "an empty image",
    "corrupt_image": "not a readable image",
    "too_many_pixels": "too many pixels",
    "unsupported_mode": "an unsupported pixel format",
}


@dataclass
class SkipStats:
    """Counts of skipped records/images by reason, with the first few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, ident: str, detail: str = "", strict: bool = False) -> None:
        """Record one skip; with ``strict`` raise :class:`DataError` instead."""
        if strict:
            raise DataError(reason, ident, detail)
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(f"{ident}: {detail}" if detail else ident)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipStats) -> SkipStats:
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            ex = self.examples.setdefault(k, [])
            ex.extend(v[: max(0, self.max_examples - len(ex))])
        return self

    def as_dict(self) -> dict:
        return dict(self.counts)

    def report(self) -> str:
        """One line per reason: ``reason: count (e.g. example, ...)``."""
        if not self.counts:
            return "no records skipped"
        lines = [f"skipped {self.total} item(s):"]
        for reason, n in sorted(self.counts.items()):
            lines.append(f"  {reason}: {n} (e.g. {'; '.join(self.examples.get(reason, []))})")
        return "\n".join(lines)


@dataclass(frozen=True)
class DetectionRecord:
    """One FakeClue-style detection record. ``label``: 0 = fake, 1 = real."""

    id: str
    image: str  # absolute path, inside the data root
    label: int
    cate: str
    question: str  # the human turn, with its ``<image>`` placeholder
    answer: str  # the gpt turn ("This is a fake image. ..." / "This is a real image. ...")
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class GenerationRecord:
    """One text-to-image pair."""

    id: str
    image: str  # absolute path, inside the data root
    prompt: str


def resolve_in_root(root: str, rel: str) -> str:
    """Absolute path of ``rel`` under ``root``; ValueError for absolute paths or escapes (``..``, symlinks out)."""
    if not isinstance(rel, str) or not rel.strip():
        raise ValueError(f"image path must be a non-empty string, got {rel!r}")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise ValueError(f"image path must be relative to the data root, got {rel!r}")
    root_real = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root_real, rel))
    if os.path.commonpath([root_real, path]) != root_real:
        raise ValueError(f"image path {rel!r} escapes the data root {root!r}")
    return path


def _read_json_records(path: str) -> list:
    """A JSON array, or JSONL (one object per line; blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(stripped)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array")
        return data
    records = []
    for i, line in enumerate(text.splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            records.append(_BadLine(f"line {i + 1}: {e.msg}"))
    return records


@dataclass(frozen=True)
class _BadLine:
    detail: str


def _parse_label(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    return None


def _parse_conversation(conv) -> tuple[str, str] | None:
    """(human text, gpt text) of the first human/gpt pair, or None if malformed."""
    if not isinstance(conv, list) or len(conv) < 2:
        return None
    human = conv[0]
    gpt = conv[1]
    if not (isinstance(human, dict) and isinstance(gpt, dict)):
        return None
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        return None
    q, a = human.get("value"), gpt.get("value")
    if not (isinstance(q, str) and isinstance(a, str) and "<image>" in q and a.strip()):
        return None
    return q, a


def _opt_int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def read_fakeclue(
    root: str,
    split: str = "train",
    *,
    json_path: str | None = None,
    image_root: str | None = None,
    balance: bool = False,
    seed: int = 42,
    strict: bool = False,
    stats: SkipStats | None = None,
) -> list[DetectionRecord]:
    """Read a FakeClue split: ``root/data_json/{split}.json`` with images under ``root/{split}/``.

    Accepts a JSON array or JSONL; unknown keys are ignored. Records with a missing/invalid ``image``, ``label``
    (0 fake / 1 real) or human/gpt ``conversations`` pair, paths that leave the image root, and missing image files
    are skipped and counted in ``stats``. ``balance`` keeps ``min(#fake, #real)`` of each class after a seeded
    shuffle (UniGenDet's rule, seed 42).
    """
    stats = stats if stats is not None else SkipStats()
    json_path = json_path or os.path.join(root, "data_json", f"{split}.json")
    image_root = image_root or os.path.join(root, split)
    out: list[DetectionRecord] = []
    for i, rec in enumerate(_read_json_records(json_path)):
        ident = f"{os.path.basename(json_path)}[{i}]"
        if isinstance(rec, _BadLine):
            stats.add("bad_record", ident, rec.detail, strict)
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            stats.add("bad_record", ident, "missing 'image'", strict)
            continue
        label = _parse_label(rec.get("label"))
        if label is None:
            stats.add("bad_label", ident, f"label={rec.get('label')!r}", strict)
            continue
        qa = _parse_conversation(rec.get("conversations"))
        if qa is None:
            stats.add("bad_conversation", ident, "need a human turn with <image> and a gpt turn", strict)
            continue
        try:
            path = resolve_in_root(image_root, rec["image"])
        except ValueError as e:
            stats.add("unsafe_path", ident, str(e), strict)
            continue
        if not os.path.isfile(path):
            stats.add("missing_file", ident, rec["image"], strict)
            continue
        cate = rec.get("cate") if isinstance(rec.get("cate"), str) else "unknown"
        out.append(
            DetectionRecord(
                id=f"{split}:{rec['image']}",
                image=path,
                label=label,
                cate=cate,
                question=qa[0],
                answer=qa[1],
                width=_opt_int(rec.get("width")),
                height=_opt_int(rec.get("height")),
            )
        )
    if balance:
        out = balance_classes(out, seed)
    if stats.total:
        log.info("read_fakeclue(%s): %d records, %s", json_path, len(out), stats.report())
    return out


def balance_classes(records: list[DetectionRecord], seed: int = 42) -> list[DetectionRecord]:
    """Seeded shuffle, then keep ``min(#label0, #label1)`` records of each class (shuffled order kept)."""
    recs = list(records)
    random.Random(seed).shuffle(recs)
    n = min(sum(r.label == 0 for r in recs), sum(r.label == 1 for r in recs))
    kept, taken = [], {0: 0, 1: 0}
    for r in recs:
        if taken[r.label] < n:
            kept.append(r)
            taken[r.label] += 1
    return kept


def _gen_record(root, rel, prompt, ident, stats, strict, id_prefix) -> GenerationRecord | None:
    if not isinstance(rel, str) or not isinstance(prompt, str):
        stats.add("bad_record", ident, "need string image path and prompt", strict)
        return None
    try:
        path = resolve_in_root(root, rel)
    except ValueError as e:
        stats.add("unsafe_path", ident, str(e), strict)
        return None
    if not os.path.isfile(path):
        stats.add("missing_file", ident, rel, strict)
        return None
    return GenerationRecord(id=f"{id_prefix}:{rel}", image=path, prompt=prompt)


def read_laion_manifest(
    root: str,
    manifest: str = "final_metadata.json",
    *,
    strict: bool = False,
    stats: SkipStats | None = None,
) -> list[GenerationRecord]:
    """UniGenDet's LAION manifest: a JSON list (or JSONL) of ``{"image_path": "images/...", "prompt": ...}``."""
    stats = stats if stats is not None else SkipStats()
    path = manifest if os.path.isabs(manifest) else os.path.join(root, manifest)
    out = []
    for i, rec in enumerate(_read_json_records(path)):
        ident = f"{os.path.basename(path)}[{i}]"
        if isinstance(rec, _BadLine) or not isinstance(rec, dict):
            stats.add("bad_record", ident, getattr(rec, "detail", "not an object"), strict)
            continue
        r = _gen_record(root, rec.get("image_path"), rec.get("prompt"), ident, stats, strict, "laion")
        if r is not None:
            out.append(r)
    return out


def read_caption_jsonl(
    path: str, root: str | None = None, *, strict: bool = False, stats: SkipStats | None = None
) -> list[GenerationRecord]:
    """JSONL/JSON list of image/caption pairs; keys ``image``/``image_path`` and ``caption``/``prompt``/``text``.

    Image paths are relative to ``root`` (default: the file's folder).
    """
    stats = stats if stats is not None else SkipStats()
    root = root or os.path.dirname(os.path.abspath(path))
    out = []
    for i, rec in enumerate(_read_json_records(path)):
        ident = f"{os.path.basename(path)}[{i}]"
        if isinstance(rec, _BadLine) or not isinstance(rec, dict):
            stats.add("bad_record", ident, getattr(rec, "detail", "not an object"), strict)
            continue
        rel = rec.get("image", rec.get("image_path"))
        prompt = next((rec[k] for k in ("caption", "prompt", "text") if isinstance(rec.get(k), str)), None)
        r = _gen_record(root, rel, prompt, ident, stats, strict, "pairs")
        if r is not None:
            out.append(r)
    return out


def read_caption_folder(
    folder: str, *, strict: bool = False, stats: SkipStats | None = None
) -> list[GenerationRecord]:
    """A folder of ``name.<image ext>`` + ``name.txt`` caption pairs (sorted by relative path)."""
    stats = stats if stats is not None else SkipStats()
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fn in sorted(filenames):
            if not fn.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = os.path.relpath(os.path.join(dirpath, fn), folder)
            txt = os.path.splitext(os.path.join(dirpath, fn))[0] + ".txt"
            if not os.path.isfile(txt):
                stats.add("missing_caption", rel, "", strict)
                continue
            with open(txt, encoding="utf-8") as f:
                prompt = f.read().strip()
            if not prompt:
                stats.add("bad_record", rel, "empty caption", strict)
                continue
            r = _gen_record(folder, rel, prompt, rel, stats, strict, "folder")
            if r is not None:
                out.append(r)
    return out


def read_generation(source: str, *, strict: bool = False, stats: SkipStats | None = None) -> list[GenerationRecord]:
    """Generation data from a LAION root (``final_metadata.json`` inside), a manifest/JSONL file, or a folder."""
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "final_metadata.json")):
            return read_laion_manifest(source, strict=strict, stats=stats)
        return read_caption_folder(source, strict=strict, stats=stats)
    with open(source, encoding="utf-8") as f:
        head = f.read(4096)
    if '"image_path"' in head and '"prompt"' in head:
        return read_laion_manifest(os.path.dirname(os.path.abspath(source)), source, strict=strict, stats=stats)
    return read_caption_jsonl(source, strict=strict, stats=stats)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def image_size(
    path: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, strict: bool = False, stats: SkipStats | None = None
) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding; None (counted) for unusable files."""
    stats = stats if stats is not None else SkipStats()
    if os.path.isdir(path):
        stats.add("not_a_file", path, "", strict)
        return None
    try:
        if os.path.getsize(path) == 0:
            stats.add("zero_size", path, "empty file", strict)
            return None
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        stats.add("missing_file", path, "", strict)
        return None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        stats.add("corrupt_image", path, type(e).__name__, strict)
        return None
    if w <= 0 or h <= 0:
        stats.add("zero_size", path, f"{w}x{h}", strict)
        return None
    if w * h > max_pixels:
        stats.add("too_many_pixels", path, f"{w}x{h} > {max_pixels}", strict)
        return None
    return w, h


def _to_rgb(im: Image.Image) -> Image.Image | None:
    """Convert any meaningful mode to 8-bit RGB (alpha composited on white); None if not meaningful."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode in ("L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return im.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (or 32-bit integer) grey: map the full 16-bit range to 8 bits.
        arr = np.asarray(im, dtype=np.int64)
        arr = np.clip(arr, 0, 65535) // 257
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return None


def load_rgb(
    path: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, strict: bool = False, stats: SkipStats | None = None
) -> Image.Image | None:
    """Decode ``path`` fully into an 8-bit RGB PIL image; None (counted in ``stats``) if unusable.

    Reasons: ``missing_file``, ``not_a_file`` (a folder), ``zero_size``, ``too_many_pixels`` (checked from the
    header, before decoding), ``corrupt_image`` (unreadable or truncated), ``unsupported_mode`` (e.g. float images).
    """
    stats = stats if stats is not None else SkipStats()
    if image_size(path, max_pixels=max_pixels, strict=strict, stats=stats) is None:
        return None
    try:
        with Image.open(path) as im:
            im.load()  # truncated files raise here (LOAD_TRUNCATED_IMAGES stays off)
            rgb = _to_rgb(im)
            if rgb is not None and rgb is im:
                rgb = im.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        stats.add("corrupt_image", path, f"{type(e).__name__}: {e}", strict)
        return None
    if rgb is None:
        stats.add("unsupported_mode", path, f"mode {im.mode}", strict)
        return None
    return rgb
