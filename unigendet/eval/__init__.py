"""Evaluation: detection/explanation metrics, FID and report writers.

* :mod:`unigendet.eval.metrics`: verdict parsing, accuracy / macro-F1, ROUGE-L, CSS, per-category tables
  (:func:`evaluate_detection`).
* :mod:`unigendet.eval.fid`: Fréchet distance and the offline Inception feature pipeline
  (:func:`fid_from_folders`, :func:`fid_from_images`).
* :mod:`unigendet.eval.report`: Markdown and JSON report writers.
"""

from .fid import (
    InceptionFeatureExtractor,
    activation_statistics,
    bundled_inception_path,
    fid_from_folders,
    fid_from_images,
    frechet_distance,
    frechet_distance_from_activations,
    preprocess_image,
)
from .metrics import (
    SentenceEmbeddingCSS,
    classification_metrics,
    evaluate_detection,
    label_from_logits,
    parse_verdict,
    rouge_l,
    score_samples,
    tfidf_css,
)
from .report import detection_markdown, generation_markdown, write_json_report, write_markdown_report

__all__ = [
    "InceptionFeatureExtractor",
    "SentenceEmbeddingCSS",
    "activation_statistics",
    "bundled_inception_path",
    "classification_metrics",
    "detection_markdown",
    "evaluate_detection",
    "fid_from_folders",
    "fid_from_images",
    "frechet_distance",
    "frechet_distance_from_activations",
    "generation_markdown",
    "label_from_logits",
    "parse_verdict",
    "preprocess_image",
    "rouge_l",
    "score_samples",
    "tfidf_css",
    "write_json_report",
    "write_markdown_report",
]
