"""Detection/explanation metrics against independent computations, and the report writers."""

import dataclasses
import json
import math
import re
from collections import Counter

import numpy as np
import pytest
from rouge_score import rouge_scorer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import accuracy_score, f1_score
from sklearn.metrics.pairwise import cosine_similarity

from unigendet.eval.metrics import (
    SentenceEmbeddingCSS,
    classification_metrics,
    evaluate_detection,
    label_from_logits,
    parse_verdict,
    record_answer,
    rouge_l,
    score_samples,
    text_scores,
    tfidf_css,
)
from unigendet.eval.report import detection_markdown, generation_markdown, write_json_report, write_markdown_report

FAKE_GT = (
    "This is a fake image. Despite its seemingly authentic appearance, the fur texture is overly smooth and the "
    "shadows under the paws fall in two directions."
)
REAL_GT = "This is a real image. The lighting is consistent, the reflections in the eyes match the scene."


def _rec(label, cate, answer, image):
    return {
        "image": image,
        "label": label,
        "cate": cate,
        "conversations": [
            {"from": "human", "value": "<image>Does the image looks real/fake?"},
            {"from": "gpt", "value": answer},
        ],
    }


RECORDS = [
    _rec(0, "animal", FAKE_GT, "genimage/fake/a.png"),
    _rec(1, "animal", REAL_GT, "genimage/real/b.png"),
    _rec(0, "deepfake", "This is a fake image. The skin is too smooth and the mouth is rigid.", "ff++/fake/c.png"),
    _rec(1, "deepfake", "This is a real image. Skin pores and eye reflections are natural.", "ff++/real/d.png"),
    _rec(0, "doc", "This is a fake image. The font spacing is inconsistent.", "doc/fake/e.png"),
    _rec(1, "doc", "This is a real image. Characters are crisp and aligned.", "doc/real/f.png"),
    _rec(0, "scene", "This is a fake image. The horizon bends unnaturally.", "genimage/fake/g.png"),
]
PREDICTIONS = [
    "This is a fake image. The fur looks too smooth and the shadows disagree.",  # correct
    "THIS IS A FAKE IMAGE. the eyes look odd",  # wrong (upper case still parses)
    "This is a fake image. The skin is too smooth.",  # correct
    "I cannot tell.",  # unparseable
    {"text": "This is a real image. Text is aligned.", "logits": [0.2, 1.5]},  # wrong; head says real
    None,  # failed sample
    {"error": "CUDA out of memory"},  # failed sample
]


# ------------------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,label",
    [
        ("This is a real image. Nice.", 1),
        ("This is a fake image. Bad hands.", 0),
        ("this is a FAKE image", 0),
        ("Answer: this is a real image, clearly", 1),
        ("This is a fake image. No wait, this is a real image.", 1),  # real phrase is checked first
        ("This image is fake.", -1),
        ("This is a real-looking image", -1),
        ("", -1),
        (None, -1),
        ("this is a  real image", -1),  # exact substring only
    ],
)
def test_parse_verdict(text, label):
    assert parse_verdict(text) == label


def test_label_from_logits():
    assert label_from_logits([2.0, -1.0]) == 0
    assert label_from_logits(np.array([[0.1, 0.3]])) == 1
    torch = pytest.importorskip("torch")
    assert label_from_logits(torch.tensor([-3.0, 4.0], dtype=torch.bfloat16)) == 1
    with pytest.raises(ValueError, match="2 values"):
        label_from_logits([1.0, 2.0, 3.0])


def test_record_answer_variants():
    assert record_answer(RECORDS[0]) == FAKE_GT
    assert record_answer({"label": 1, "answer": "x"}) == "x"

    class R:
        label = 0
        answer = "y"

    assert record_answer(R()) == "y"


# ------------------------------------------------------------------------------------------------------------
# Text metrics
# ------------------------------------------------------------------------------------------------------------

PAIRS = [
    (FAKE_GT, PREDICTIONS[0].lower()),
    (REAL_GT, "this is a real image. the lighting is consistent."),
    ("This is a fake image. Blurry hairline.", "this is a fake image. blurry hairline."),
    ("This is a fake image. Running dogs jumped.", "this is a fake image. the dog runs and jumps"),
    ("Completely different words here.", "nothing shared at all"),
]


def _hand_tfidf_cosine(a: str, b: str) -> float:
    """TF-IDF cosine by hand with sklearn's defaults: lower-case, \\b\\w\\w+\\b tokens, smooth idf, L2 norm."""
    docs = [Counter(re.findall(r"(?u)\b\w\w+\b", d.lower())) for d in (a, b)]
    vocab = sorted(set(docs[0]) | set(docs[1]))
    n = 2
    idf = {t: math.log((1 + n) / (1 + sum(t in d for d in docs))) + 1 for t in vocab}
    vecs = []
    for d in docs:
        v = np.array([d[t] * idf[t] for t in vocab], dtype=np.float64)
        norm = np.linalg.norm(v)
        vecs.append(v / norm if norm > 0 else v)
    return float(vecs[0] @ vecs[1])


@pytest.mark.parametrize("ref,cand", PAIRS)
def test_tfidf_css_matches_hand_computation_and_sklearn(ref, cand):
    got = tfidf_css(ref, cand)
    assert got == pytest.approx(_hand_tfidf_cosine(ref, cand), abs=1e-12)
    m = TfidfVectorizer().fit_transform([ref, cand])
    assert got == pytest.approx(float(cosine_similarity(m[0:1], m[1:2])[0][0]), abs=1e-12)


def test_tfidf_css_identical_and_degenerate():
    assert tfidf_css("the same text", "the same text") == pytest.approx(1.0)
    # Shared terms get idf 1, so two texts sharing every term are parallel.
    assert tfidf_css("a cat cat", "cat") == pytest.approx(1.0)
    assert tfidf_css("", "anything") == 0.0
    assert tfidf_css("anything", "") == 0.0
    # Empty vocabulary (only punctuation / one-letter tokens) must not raise.
    assert tfidf_css("a . ! ?", "i , ;") == 0.0
    assert tfidf_css("real words", "a b c") == 0.0


@pytest.mark.parametrize("ref,cand", PAIRS)
def test_rouge_l_matches_rouge_score(ref, cand):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert rouge_l(ref, cand) == pytest.approx(scorer.score(ref, cand)["rougeL"].fmeasure, abs=1e-12)


def test_rouge_l_uses_stemmer():
    # Without the stemmer "running"/"runs" and "jumped"/"jumps" would not match.
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score("running jumped", "runs jumps")
    assert plain["rougeL"].fmeasure == 0.0
    assert rouge_l("running jumped", "runs jumps") == pytest.approx(1.0)


def test_text_scores_lowercases_candidate_and_handles_empty():
    ref = "This is a fake image. Odd Shadows."
    r, c = text_scores(ref, "THIS IS A FAKE IMAGE. ODD SHADOWS.")
    assert r == pytest.approx(1.0) and c == pytest.approx(1.0)
    assert text_scores(ref, "") == (0.0, 0.0)
    assert text_scores("", "x") == (0.0, 0.0)


# ------------------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------------------


def test_classification_metrics_against_sklearn():
    labels = [0, 1, 0, 1, 1, 0, 0, 1]
    preds = [0, 0, -1, 1, 1, 1, 0, -1]
    res = classification_metrics(labels, preds)
    valid = [i for i, p in enumerate(preds) if p != -1]
    y = [labels[i] for i in valid]
    p = [preds[i] for i in valid]
    assert res["num_valid"] == 6 and res["num_unparseable"] == 2
    assert res["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert res["f1_macro"] == pytest.approx(f1_score(y, p, average="macro"))
    assert res["real_accuracy"] == pytest.approx(2 / 3)
    assert res["fake_accuracy"] == pytest.approx(2 / 3)
    empty = classification_metrics([0, 1], [-1, -1])
    assert empty["accuracy"] is None and empty["f1_macro"] is None


def test_evaluate_detection_against_independent_computation():
    res = evaluate_detection(RECORDS, PREDICTIONS, return_samples=True)
    assert res["num_samples"] == 7 and res["num_errors"] == 2
    # Independent computation over the five non-failed samples.
    texts = [p if isinstance(p, str) else p["text"] for p in PREDICTIONS[:5]]
    parsed = [
        1 if "this is a real image" in t.lower() else 0 if "this is a fake image" in t.lower() else -1 for t in texts
    ]
    gts = [r["label"] for r in RECORDS[:5]]
    y = [g for g, p in zip(gts, parsed) if p != -1]
    p = [q for q in parsed if q != -1]
    assert res["num_valid"] == 4 and res["num_unparseable"] == 1
    assert res["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert res["f1_macro"] == pytest.approx(f1_score(y, p, average="macro"))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    answers = [r["conversations"][1]["value"] for r in RECORDS[:5]]
    rouge = [scorer.score(a, t.lower())["rougeL"].fmeasure for a, t in zip(answers, texts)]
    css = [_hand_tfidf_cosine(a, t.lower()) for a, t in zip(answers, texts)]
    # ROUGE-L and CSS average over every non-failed sample, the unparseable one included.
    assert res["num_text_scored"] == 5
    assert res["rouge_l"] == pytest.approx(np.mean(rouge), abs=1e-12)
    assert res["css"] == pytest.approx(np.mean(css), abs=1e-12)
    # The single sample with head logits.
    assert res["head"]["num_valid"] == 1 and res["head"]["accuracy"] == 0.0
    # Per category.
    cats = res["per_category"]
    assert set(cats) == {"animal", "deepfake", "doc", "scene"}
    assert cats["animal"]["accuracy"] == 0.5 and cats["animal"]["num_valid"] == 2
    assert cats["deepfake"]["accuracy"] == 1.0 and cats["deepfake"]["num_unparseable"] == 1
    assert cats["doc"]["num_errors"] == 1 and cats["doc"]["accuracy"] == 0.0
    assert cats["scene"]["num_errors"] == 1 and cats["scene"]["accuracy"] is None
    assert cats["animal"]["rouge_l"] == pytest.approx(np.mean(rouge[:2]))
    assert [s["verdict"] for s in res["samples"]] == parsed + [None, None]
    assert res["samples"][5]["error"] == "no prediction"


def test_evaluate_detection_logits_source():
    preds = [{"logits": [1.0, 0.0]}, {"logits": [0.0, 1.0]}, {"logits": [0.0, 2.0]}, {"logits": [0.5, 0.1]}]
    res = evaluate_detection(RECORDS[:4], preds, label_source="logits")
    assert res["accuracy"] == pytest.approx(0.5)
    assert res["f1_macro"] == pytest.approx(f1_score([0, 1, 0, 1], [0, 1, 1, 0], average="macro"))
    assert res["rouge_l"] is None and res["css"] is None and "verdict" not in res


def test_evaluate_detection_validation():
    with pytest.raises(ValueError, match="differ in length"):
        evaluate_detection(RECORDS, PREDICTIONS[:3])
    with pytest.raises(ValueError, match="label"):
        evaluate_detection([{"label": 2, "answer": "x"}], ["x"])
    with pytest.raises(ValueError, match="neither"):
        evaluate_detection(RECORDS[:1], [{"foo": 1}])
    with pytest.raises(ValueError, match="css_model_path"):
        evaluate_detection(RECORDS[:1], ["x"], css_backend="sentence")


def test_sentence_css_missing_model_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        SentenceEmbeddingCSS(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        SentenceEmbeddingCSS(tmp_path)


def test_sentence_css_with_tiny_local_model(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    words = ["this", "is", "a", "fake", "real", "image", "the", "hands", "look", "wrong", "."]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    tok.save_pretrained(tmp_path)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(tmp_path)

    css = SentenceEmbeddingCSS(tmp_path)
    a, b = "this is a fake image .", "the hands look wrong"
    # Independent mean pooling with the same weights.
    model = transformers.BertModel.from_pretrained(tmp_path).eval()
    embs = []
    for text in (a, b):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]
        embs.append(h.mean(0).double())
    expected = float(torch.nn.functional.cosine_similarity(embs[0], embs[1], dim=0))
    assert css(a, b) == pytest.approx(expected, abs=1e-5)
    assert css(a, a) == pytest.approx(1.0, abs=1e-6)
    assert css(a, "") == 0.0
    res = evaluate_detection(RECORDS[:2], PREDICTIONS[:2], css_backend="sentence", css_model_path=tmp_path)
    assert res["css_backend"] == "sentence" and -1.0 <= res["css"] <= 1.0


def test_attribute_records():
    @dataclasses.dataclass(frozen=True)
    class Rec:
        id: str
        image: str
        label: int
        cate: str
        answer: str

    recs = [
        Rec("r0", "/data/x.png", 0, "doc", "This is a fake image. Misaligned text."),
        Rec("r1", "/data/y.png", 1, "doc", "This is a real image. Crisp text."),
    ]
    res = evaluate_detection(
        recs, ["This is a fake image. misaligned text.", "This is a fake image."], return_samples=True
    )
    assert res["accuracy"] == 0.5 and res["per_category"]["doc"]["num_valid"] == 2
    assert [s["key"] for s in res["samples"]] == ["r0", "r1"]
    assert res["samples"][0]["rouge_l"] == pytest.approx(1.0)


def test_score_samples_keys():
    samples = score_samples(RECORDS[:2], PREDICTIONS[:2])
    assert samples[0].key == "genimage/fake/a.png" and samples[0].category == "animal"
    assert samples[0].verdict == 0 and samples[1].verdict == 0


# ------------------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------------------


def test_reports_written(tmp_path):
    res = evaluate_detection(RECORDS, PREDICTIONS, return_samples=True)
    res["fid_placeholder_array"] = np.arange(3)  # numpy values must serialise
    jpath = write_json_report(res, tmp_path / "out" / "det.json")
    loaded = json.loads(open(jpath, encoding="utf-8").read())
    assert loaded["accuracy"] == pytest.approx(res["accuracy"])
    assert loaded["per_category"]["scene"]["accuracy"] is None
    assert loaded["fid_placeholder_array"] == [0, 1, 2]
    assert len(loaded["samples"]) == 7

    mpath = write_markdown_report(res, tmp_path / "det.md")
    md = open(mpath, encoding="utf-8").read()
    assert md == detection_markdown(res)
    assert "| overall |" in md and "### Per category" in md
    assert f"{100 * res['accuracy']:.2f}" in md
    for cate in ("animal", "deepfake", "doc", "scene"):
        assert f"| {cate} |" in md
    assert "overall (detection head)" in md
    # Every table row has the same number of cells as the header.
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in rows}) == 1

    gpath = write_markdown_report({"fid": 17.5, "num_generated": 10}, tmp_path / "gen.md", kind="generation")
    assert "| fid | 17.5000 |" in open(gpath).read()
    assert "| num_generated | 10 |" in generation_markdown({"num_generated": 10})
    with pytest.raises(ValueError, match="kind"):
        write_markdown_report(res, tmp_path / "x.md", kind="other")


def test_per_category_f1_only_where_both_classes_are_present():
    recs = [{"id": f"r{i}", "label": lab, "cate": cate, "answer": "This is a real image." if lab else
             "This is a fake image."} for i, (lab, cate) in enumerate(
                 [(1, "photo"), (1, "photo"), (1, "photo"), (0, "photo"), (0, "gan"), (0, "gan"), (0, "gan")])]
    preds = ["This is a real image.", "This is a real image.", "This is a fake image.", "This is a fake image.",
             "This is a fake image.", "This is a fake image.", "This is a real image."]
    res = evaluate_detection(recs, preds)
    photo, gan = res["per_category"]["photo"], res["per_category"]["gan"]
    assert (photo["num_real"], photo["num_fake"], gan["num_real"], gan["num_fake"]) == (3, 1, 0, 3)
    assert photo["f1_macro"] is not None and photo["accuracy"] == 0.75
    assert gan["f1_macro"] is None and gan["verdict"]["f1_macro"] is None and gan["accuracy"] == pytest.approx(2 / 3)
    assert res["f1_macro"] is not None  # the overall number stays the official macro-F1
    md = detection_markdown(res)
    assert "| real | fake |" in md and "F1 is shown only for categories holding both" in md
