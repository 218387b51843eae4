"""Markdown and JSON reports for detection and generation results.

The detection result dict is the one :func:`unigendet.eval.metrics.evaluate_detection` returns; generation
results are plain dicts such as ``{"fid": 17.5, "num_generated": 5000, "num_reference": 5000}``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "detection_markdown",
    "generation_markdown",
    "to_jsonable",
    "write_json_report",
    "write_markdown_report",
]

_COLUMNS = (
    ("n", "num_samples", "int"),
    ("real", "num_real", "int"),
    ("fake", "num_fake", "int"),
    ("errors", "num_errors", "int"),
    ("parsed", "num_valid", "int"),
    ("unparsed", "num_unparseable", "int"),
    ("Acc (%)", "accuracy", "pct"),
    ("F1 (%)", "f1_macro", "pct"),
    ("Real acc (%)", "real_accuracy", "pct"),
    ("Fake acc (%)", "fake_accuracy", "pct"),
    ("ROUGE-L", "rouge_l", "num"),
    ("CSS", "css", "num"),
)


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "int":
        return str(int(value))
    if kind == "pct":
        return f"{100.0 * float(value):.2f}"
    return f"{float(value):.4f}"


def _table(rows: list[tuple[str, Mapping[str, Any]]], first: str) -> str:
    header = "| " + " | ".join([first] + [c[0] for c in _COLUMNS]) + " |"
    sep = "| " + " | ".join(["---"] + ["---:"] * len(_COLUMNS)) + " |"
    lines = [header, sep]
    for name, res in rows:
        cells = [name.replace("|", "\\|")] + [_fmt(res.get(key), kind) for _, key, kind in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detection_markdown(result: Mapping[str, Any], title: str = "Detection results") -> str:
    """Render an :func:`~unigendet.eval.metrics.evaluate_detection` result as Markdown tables.

    The first table holds the overall numbers (and the other verdict source, text or head, when present); the
    second the per-category breakdown, if the result has one.
    """
    source = result.get("label_source", "text")
    parts = [f"## {title}", ""]
    parts.append(
        f"Verdict source: `{source}`; CSS: `{result.get('css_backend', 'tfidf')}`. Accuracy and F1 are over "
        "parseable predictions; ROUGE-L and CSS over all samples that did not fail."
    )
    parts.append("")
    rows: list[tuple[str, Mapping[str, Any]]] = [("overall", result)]
    other = "head" if source == "text" else "verdict"
    if isinstance(result.get(other), Mapping):
        label = "detection head" if other == "head" else "parsed answer"
        rows.append((f"overall ({label})", {**result[other], "num_samples": result.get("num_samples")}))
    parts.append(_table(rows, "split"))
    per_cat = result.get("per_category")
    if per_cat:
        parts += ["", "### Per category", ""]
        parts.append(_table(list(per_cat.items()), "category"))
        if any(r.get("f1_macro") is None and r.get("accuracy") is not None for r in per_cat.values()):
            parts += ["", "F1 is shown only for categories holding both real and fake images (macro-F1 over one "
                      "class is not meaningful); accuracy and the real/fake counts are always shown."]
    return "\n".join(parts) + "\n"


def generation_markdown(result: Mapping[str, Any], title: str = "Generation results") -> str:
    """Render a flat mapping of generation metrics (e.g. FID) as a two-column Markdown table."""
    lines = [f"## {title}", "", "| metric | value |", "| --- | ---: |"]
    for key, value in result.items():
        if isinstance(value, Mapping) and value and all(isinstance(v, float) for v in value.values()):
            lines += [f"| {key}.{k} | {v:.4f} |" for k, v in value.items()]  # e.g. per-attribute accuracies
            continue
        if isinstance(value, float):
            text = f"{value:.4f}"
        elif isinstance(value, (Mapping, list, tuple)):
            continue
        else:
            text = str(value)
        lines.append(f"| {key} | {text} |")
    return "\n".join(lines) + "\n"


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, tuples and paths to JSON-serialisable Python objects.

    Non-finite floats become ``None`` so the output is strict JSON.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json_report(result: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Write ``result`` as indented UTF-8 JSON (creating parent folders); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_jsonable(result), f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")
    return path


def write_markdown_report(
    result: Mapping[str, Any], path: str | os.PathLike, kind: str = "detection", title: str | None = None
) -> str:
    """Write a Markdown report (``kind`` ``"detection"`` or ``"generation"``); returns the path."""
    if kind == "detection":
        text = detection_markdown(result, title or "Detection results")
    elif kind == "generation":
        text = generation_markdown(result, title or "Generation results")
    else:
        raise ValueError(f"kind must be 'detection' or 'generation', got {kind!r}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
