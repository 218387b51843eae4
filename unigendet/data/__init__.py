"""Data: readers, transforms, the embedded data set, sequence packing and loaders.

``nvidia-dali`` is optional: :mod:`unigendet.data.dali` imports it lazily, everything else works without it.
"""

from .batch import DigaTeacherBatch, PackedBatch
from .embedded import EmbeddedDataset, build_embedded, embedded_dataset
from .loader import PackedDataset, PackedLoader, load_records
from .packing import PackingConfig, build_diga_batch, build_packed_batch
from .readers import (
    DataError,
    DetectionRecord,
    GenerationRecord,
    SkipStats,
    load_rgb,
    read_caption_folder,
    read_caption_jsonl,
    read_fakeclue,
    read_generation,
    read_laion_manifest,
)
from .transforms import ImageTransform, patchify, target_size, vae_transform, vit_transform

__all__ = [
    "DataError",
    "DetectionRecord",
    "DigaTeacherBatch",
    "EmbeddedDataset",
    "GenerationRecord",
    "ImageTransform",
    "PackedBatch",
    "PackedDataset",
    "PackedLoader",
    "PackingConfig",
    "SkipStats",
    "build_diga_batch",
    "build_embedded",
    "build_packed_batch",
    "embedded_dataset",
    "load_records",
    "load_rgb",
    "patchify",
    "read_caption_folder",
    "read_caption_jsonl",
    "read_fakeclue",
    "read_generation",
    "read_laion_manifest",
    "target_size",
    "vae_transform",
    "vit_transform",
]
