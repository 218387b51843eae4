"""Detection and explanation metrics, computed the way the UniGenDet evaluation script computes them.

Per sample:

* **Verdict** (:func:`parse_verdict`): the lower-cased output containing ``"this is a real image"`` is label 1
  (real); otherwise containing ``"this is a fake image"`` is label 0 (fake); otherwise -1 (unparseable).
* **Head verdict** (:func:`label_from_logits`): the arg-max of the 2-way detection-head logits
  (index 0 fake, 1 real).
* **ROUGE-L** (:func:`rouge_l`): ``rouge_score`` ``rougeL`` F-measure with the Porter stemmer, reference = the
  ground-truth answer, candidate = the lower-cased output.
* **CSS** (:func:`tfidf_css`): cosine similarity of the TF-IDF vectors of ``[ground truth, output]`` from a
  default ``sklearn`` ``TfidfVectorizer`` fitted on that pair alone. :class:`SentenceEmbeddingCSS` is an optional
  neural alternative that loads a sentence-embedding model from a local directory.

Aggregates (:func:`evaluate_detection`): accuracy = correct / parseable predictions and macro-F1
(``sklearn.metrics.f1_score(average="macro")``) over the parseable predictions only; unparseable outputs are
counted but not scored as wrong. ROUGE-L and CSS are averaged over every sample that did not fail, parseable or
not (an empty output scores 0 on both). Failed samples (prediction ``None`` or carrying an ``"error"``) are
excluded from everything and counted. The same numbers are reported per category (``cate``).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "FAKE_PHRASE",
    "LABEL_FAKE",
    "LABEL_REAL",
    "LABEL_UNPARSEABLE",
    "REAL_PHRASE",
    "SampleScore",
    "SentenceEmbeddingCSS",
    "classification_metrics",
    "evaluate_detection",
    "label_from_logits",
    "parse_verdict",
    "record_answer",
    "record_category",
    "record_label",
    "rouge_l",
    "score_samples",
    "text_scores",
    "tfidf_css",
]

LABEL_FAKE = 0
LABEL_REAL = 1
LABEL_UNPARSEABLE = -1
REAL_PHRASE = "this is a real image"
FAKE_PHRASE = "this is a fake image"


# --------------------------------------------------------------------------------------------------------------
# Per-sample metrics
# --------------------------------------------------------------------------------------------------------------


def parse_verdict(text: str | None) -> int:
    """Map a generated answer to a label: 1 (real), 0 (fake) or -1 (unparseable).

    The real phrase is checked first, so an answer containing both phrases counts as real (as in the reference).
    """
    if not text:
        return LABEL_UNPARSEABLE
    lowered = text.lower()
    if REAL_PHRASE in lowered:
        return LABEL_REAL
    if FAKE_PHRASE in lowered:
        return LABEL_FAKE
    return LABEL_UNPARSEABLE


def label_from_logits(logits: Any) -> int:
    """Arg-max of 2-way detection-head logits ``(2,)`` (or ``(1, 2)``): 0 fake, 1 real."""
    arr = np.asarray(logits.detach().float().cpu() if hasattr(logits, "detach") else logits, dtype=np.float64)
    arr = arr.reshape(-1)
    if arr.shape != (2,):
        raise ValueError(f"logits must hold exactly 2 values (fake, real), got shape {np.shape(logits)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"logits must be finite, got {arr.tolist()}")
    return int(np.argmax(arr))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F-measure (``rouge_score``, ``use_stemmer=True``) of ``candidate`` against ``reference``."""
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].fmeasure)


def tfidf_css(reference: str, candidate: str) -> float:
    """Cosine similarity of TF-IDF vectors fitted on the pair ``[reference, candidate]`` alone.

    Uses a default ``sklearn`` ``TfidfVectorizer`` (lower-casing, ``\\b\\w\\w+\\b`` tokens, smooth IDF, L2 norm).
    Returns 0.0 when either text is empty or the pair has no token at all (where the vectorizer would raise
    "empty vocabulary"); a text with tokens against one without scores 0.0 as well.
    """
    if not reference or not candidate:
        return 0.0
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    try:
        matrix = TfidfVectorizer().fit_transform([reference, candidate])
    except ValueError:
        # Only raised for an empty vocabulary (e.g. both texts are punctuation or one-letter words).
        return 0.0
    return float(cosine_similarity(matrix[0:1], matrix[1:2])[0, 0])


class SentenceEmbeddingCSS:
    """Cosine similarity of mean-pooled sentence embeddings from a local ``transformers`` encoder.

    ``model_path`` is a directory holding a Hugging Face encoder (``config.json``, weights, tokenizer files), or
    a sentence-transformers export whose encoder sits in the directory itself or in ``0_Transformer/``. Nothing is
    ever downloaded: the directory must exist and is opened with ``local_files_only=True``. Pooling is the mean
    over non-padding tokens unless ``1_Pooling/config.json`` asks for the CLS token.

    Example::

        css = SentenceEmbeddingCSS("/models/all-MiniLM-L6-v2")
        css("This is a fake image.", "this is a fake image. the hands are wrong")
    """

    def __init__(self, model_path: str | os.PathLike, device: str = "cpu", max_length: int = 256):
        path = os.fspath(model_path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"sentence-embedding model directory not found: {path!r}. Pass a local directory containing a "
                "transformers encoder (config.json, weights, tokenizer); models are never downloaded."
            )
        root = path
        if not os.path.isfile(os.path.join(root, "config.json")) and os.path.isfile(
            os.path.join(root, "0_Transformer", "config.json")
        ):
            root = os.path.join(root, "0_Transformer")
        if not os.path.isfile(os.path.join(root, "config.json")):
            raise FileNotFoundError(f"no config.json in {path!r} (or its 0_Transformer/ folder)")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        self.model = AutoModel.from_pretrained(root, local_files_only=True).to(device).eval()
        self.device = device
        self.max_length = max_length
        self.pooling = "mean"
        pool_cfg = os.path.join(path, "1_Pooling", "config.json")
        if os.path.isfile(pool_cfg):
            import json

            with open(pool_cfg, encoding="utf-8") as f:
                if json.load(f).get("pooling_mode_cls_token"):
                    self.pooling = "cls"

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Return L2-normalised embeddings ``(len(texts), hidden)`` as float64."""
        torch = self._torch
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                if self.pooling == "cls":
                    emb = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                emb = torch.nn.functional.normalize(emb, dim=-1)
                out.append(emb.double().cpu().numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0, 0))

    def __call__(self, reference: str, candidate: str) -> float:
        """Cosine similarity of the two texts; 0.0 if either is empty."""
        if not reference or not candidate:
            return 0.0
        emb = self.embed([reference, candidate])
        return float(emb[0] @ emb[1])


def text_scores(reference: str | None, candidate: str | None, css_fn=tfidf_css) -> tuple[float, float]:
    """``(ROUGE-L, CSS)`` of one answer; both 0.0 when either text is empty, as in the reference script.

    The candidate is lower-cased first (the reference scores the lower-cased output).
    """
    if not reference or not candidate:
        return 0.0, 0.0
    candidate = candidate.lower()
    return rouge_l(reference, candidate), float(css_fn(reference, candidate))


# --------------------------------------------------------------------------------------------------------------
# Record / prediction access
# --------------------------------------------------------------------------------------------------------------


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(obj, Mapping):
            if name in obj:
                return obj[name]
        elif hasattr(obj, name):
            return getattr(obj, name)
    return default


def record_label(record: Any) -> int:
    """Ground-truth label of a record (``record["label"]`` or ``record.label``): 0 fake, 1 real."""
    label = _get(record, "label")
    try:
        label = int(label)
    except (TypeError, ValueError):
        raise ValueError(f"record label must be 0 (fake) or 1 (real), got {label!r}") from None
    if label not in (LABEL_FAKE, LABEL_REAL):
        raise ValueError(f"record label must be 0 (fake) or 1 (real), got {label!r}")
    return label


def record_answer(record: Any) -> str:
    """Ground-truth answer: the first ``gpt`` turn of ``conversations``, or an ``answer`` field/attribute."""
    answer = _get(record, "answer", "gt_response")
    if answer is not None:
        return str(answer)
    conversations = _get(record, "conversations", default=None) or []
    for turn in conversations:
        if _get(turn, "from") in ("gpt", "assistant"):
            return str(_get(turn, "value", default=""))
    if len(conversations) >= 2:
        return str(_get(conversations[1], "value", default=""))
    return ""


def record_category(record: Any) -> str | None:
    """Category of a record (``cate`` or ``category``), or ``None``."""
    cate = _get(record, "cate", "category")
    return None if cate is None else str(cate)


def _record_key(record: Any, index: int) -> str:
    key = _get(record, "id", "image")
    return str(key) if key is not None else str(index)


# --------------------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SampleScore:
    """Scores of one evaluated sample (``error`` set means the sample failed and is excluded)."""

    key: str
    label: int
    category: str | None
    verdict: int | None = None
    head: int | None = None
    rouge_l: float | None = None
    css: float | None = None
    response: str | None = None
    ground_truth: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _split_prediction(pred: Any) -> tuple[str | None, Any, str | None]:
    """Return ``(text, logits, error)`` of a prediction."""
    if pred is None:
        return None, None, "no prediction"
    if isinstance(pred, str):
        return pred, None, None
    if isinstance(pred, Mapping):
        error = pred.get("error")
        text = pred.get("text", pred.get("response"))
        if text is not None and not isinstance(text, str):
            raise ValueError(f"prediction text must be a string, got {type(text).__name__}")
        return text, pred.get("logits"), (str(error) if error else None)
    raise ValueError(
        f"prediction must be a string, a mapping with 'text'/'logits'/'error', or None; got {type(pred).__name__}"
    )


def score_samples(records: Sequence[Any], predictions: Sequence[Any], *, css_fn=tfidf_css) -> list[SampleScore]:
    """Score every ``(record, prediction)`` pair.

    Args:
        records: FakeClue-style records: mappings or objects (e.g. ``unigendet.data`` detection records) with
            ``label``, ``conversations`` or ``answer``, and optional ``cate`` and ``id``/``image`` (the sample key).
        predictions: one per record: the generated text (``str``); a mapping with optional ``"text"``,
            ``"logits"`` (the 2 detection-head logits) and ``"error"``; or ``None`` for a failed sample.
        css_fn: ``(reference, candidate) -> float``; :func:`tfidf_css` by default.

    Returns:
        One :class:`SampleScore` per record. ``verdict`` is set when the prediction has text (``-1`` when
        unparseable), ``head`` when it has logits; ``rouge_l``/``css`` are set whenever it has text.
    """
    if len(records) != len(predictions):
        raise ValueError(f"records ({len(records)}) and predictions ({len(predictions)}) differ in length")
    out = []
    for i, (record, pred) in enumerate(zip(records, predictions)):
        try:
            label = record_label(record)
        except ValueError as e:
            raise ValueError(f"records[{i}]: {e}") from None
        answer = record_answer(record)
        text, logits, error = _split_prediction(pred)
        s = SampleScore(key=_record_key(record, i), label=label, category=record_category(record))
        s.ground_truth = answer
        if error is not None:
            s.error = error
            out.append(s)
            continue
        if text is not None:
            s.response = text
            s.verdict = parse_verdict(text)
            s.rouge_l, s.css = text_scores(answer, text, css_fn)
        if logits is not None:
            try:
                s.head = label_from_logits(logits)
            except ValueError as e:
                raise ValueError(f"predictions[{i}]: {e}") from None
        if text is None and logits is None:
            raise ValueError(f"predictions[{i}] has neither text nor logits")
        out.append(s)
    return out


def classification_metrics(labels: Sequence[int], preds: Sequence[int]) -> dict:
    """Accuracy and macro-F1 over the parseable predictions (``pred != -1``).

    Returns a dict with ``num`` (all given), ``num_valid``, ``num_unparseable``, ``accuracy``, ``f1_macro``,
    ``real_accuracy`` and ``fake_accuracy`` (accuracy restricted to ground-truth real / fake among the valid
    ones). Rates are fractions in [0, 1], ``None`` when there is nothing to score.
    """
    from sklearn.metrics import f1_score

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    preds = np.asarray(preds, dtype=np.int64).reshape(-1)
    if labels.shape != preds.shape:
        raise ValueError(f"labels {labels.shape} and preds {preds.shape} differ in shape")
    valid = preds != LABEL_UNPARSEABLE
    y, p = labels[valid], preds[valid]
    res: dict[str, Any] = {
        "num": int(labels.size),
        "num_valid": int(valid.sum()),
        "num_unparseable": int((~valid).sum()),
        "accuracy": None,
        "f1_macro": None,
        "real_accuracy": None,
        "fake_accuracy": None,
    }
    if y.size:
        res["accuracy"] = float((y == p).mean())
        # Same call as the reference: labels inferred from the data, macro over the classes present.
        res["f1_macro"] = float(f1_score(y.tolist(), p.tolist(), average="macro"))
        for name, cls in (("real_accuracy", LABEL_REAL), ("fake_accuracy", LABEL_FAKE)):
            m = y == cls
            if m.any():
                res[name] = float((p[m] == cls).mean())
    return res


def _mean_or_none(values: list[float]) -> float | None:
    return float(math.fsum(values) / len(values)) if values else None


def _summarise(samples: list[SampleScore], primary: str, *, f1_needs_both_classes: bool = False) -> dict:
    ok = [s for s in samples if s.error is None]
    res: dict[str, Any] = {"num_samples": len(samples), "num_errors": len(samples) - len(ok),
                           "num_real": sum(s.label == LABEL_REAL for s in ok),
                           "num_fake": sum(s.label == LABEL_FAKE for s in ok)}
    blocks = {}
    with_text = [s for s in ok if s.verdict is not None]
    with_head = [s for s in ok if s.head is not None]
    if with_text:
        blocks["verdict"] = classification_metrics([s.label for s in with_text], [s.verdict for s in with_text])
    if with_head:
        blocks["head"] = classification_metrics([s.label for s in with_head], [s.head for s in with_head])
    if f1_needs_both_classes and not (res["num_real"] and res["num_fake"]):
        # Macro-F1 over a single ground-truth class averages that class's F1 with a zero for the absent one
        # (0.487 at 0.95 accuracy): accuracy and the counts say what there is to say.
        for block in blocks.values():
            block["f1_macro"] = None
    main = blocks.get(primary) or classification_metrics([], [])
    for k in ("num_valid", "num_unparseable", "accuracy", "f1_macro", "real_accuracy", "fake_accuracy"):
        res[k] = main[k]
    scored = [s for s in ok if s.rouge_l is not None]
    res["num_text_scored"] = len(scored)
    res["rouge_l"] = _mean_or_none([s.rouge_l for s in scored])
    res["css"] = _mean_or_none([s.css for s in scored])
    res.update(blocks)
    return res


def evaluate_detection(
    records: Sequence[Any],
    predictions: Sequence[Any],
    *,
    label_source: Literal["text", "logits"] = "text",
    css_backend: Literal["tfidf", "sentence"] = "tfidf",
    css_model_path: str | os.PathLike | None = None,
    per_category: bool = True,
    return_samples: bool = False,
) -> dict:
    """Detection accuracy, macro-F1, ROUGE-L and CSS over a test set, overall and per category.

    Args:
        records: ground-truth records (see :func:`score_samples`).
        predictions: one per record (see :func:`score_samples`).
        label_source: which verdict the headline ``accuracy``/``f1_macro`` use: ``"text"`` (parsed answer) or
            ``"logits"`` (detection-head arg-max). Both are always reported under ``"verdict"`` / ``"head"``
            when available.
        css_backend: ``"tfidf"`` (the reference definition) or ``"sentence"`` (:class:`SentenceEmbeddingCSS`
            loaded from ``css_model_path``).
        per_category: add a ``"per_category"`` dict keyed by ``cate``; there ``f1_macro`` is ``None`` for a category
            whose samples are all real or all fake (``num_real`` / ``num_fake`` give the counts).
        return_samples: add the per-sample scores under ``"samples"`` (list of dicts).

    Returns:
        ``{"num_samples", "num_errors", "num_valid", "num_unparseable", "accuracy", "f1_macro",
        "real_accuracy", "fake_accuracy", "num_text_scored", "rouge_l", "css", "verdict"?, "head"?,
        "label_source", "css_backend", "per_category"?, "samples"?}``. Rates are fractions; a metric with
        nothing to score is ``None``.
    """
    if label_source not in ("text", "logits"):
        raise ValueError(f"label_source must be 'text' or 'logits', got {label_source!r}")
    if css_backend == "tfidf":
        css_fn = tfidf_css
    elif css_backend == "sentence":
        if css_model_path is None:
            raise ValueError("css_backend='sentence' needs css_model_path (a local model directory)")
        css_fn = SentenceEmbeddingCSS(css_model_path)
    else:
        raise ValueError(f"css_backend must be 'tfidf' or 'sentence', got {css_backend!r}")
    samples = score_samples(records, predictions, css_fn=css_fn)
    primary = "verdict" if label_source == "text" else "head"
    result = _summarise(samples, primary)
    result["label_source"] = label_source
    result["css_backend"] = css_backend
    if per_category:
        groups: dict[str, list[SampleScore]] = {}
        for s in samples:
            groups.setdefault(s.category if s.category is not None else "unknown", []).append(s)
        result["per_category"] = {c: _summarise(groups[c], primary, f1_needs_both_classes=True) for c in sorted(groups)}
    if return_samples:
        result["samples"] = [s.to_dict() for s in samples]
    return result
