"""Inference: detection with explanations (static-KV-cache decoding) and text-to-image generation."""

from .detect import DEFAULT_QUESTION, DetectionResult, Detector, decode_answers, detection_plan, split_explanation
from .generate import ImageGenerator, tensor_to_pil
from .kv_cache import StaticKVCache
from .loading import default_device, load_for_inference, packing_for

__all__ = [
    "DEFAULT_QUESTION",
    "DetectionResult",
    "Detector",
    "ImageGenerator",
    "StaticKVCache",
    "decode_answers",
    "default_device",
    "detection_plan",
    "load_for_inference",
    "packing_for",
    "split_explanation",
    "tensor_to_pil",
]
