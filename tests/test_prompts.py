"""The prompts: each defined once, the official texts, and where each one is used."""

import glob
import os

import pytest

import unigendet
from unigendet.prompts import (
    FAKECLUE_QUESTION,
    OFFICIAL_FORMAT_SUFFIX,
    detection_prompt,
    diga_teacher_prompt,
)


def test_each_prompt_text_is_written_once_in_the_package():
    root = os.path.dirname(unigendet.__file__)
    phrases = ("Does the image looks real/fake", "Example Output Format", "You are a forensic image analyst",
               "Act as a forensic image analyst")
    for phrase in phrases:
        holders = [os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if phrase in open(p, encoding="utf-8").read()]
        assert holders == ["prompts.py"], (phrase, holders)


def test_detection_prompt_styles():
    assert detection_prompt() == "Does the image looks real/fake?"  # the text after <image>, as trained
    assert detection_prompt(FAKECLUE_QUESTION, "fakeclue") == "Does the image looks real/fake?"
    # The official evaluation: question.replace("<image>", "").strip() + the output-format block.
    q = "<image>\nIs this photo real or fake? "
    assert detection_prompt(q, "official") == "Is this photo real or fake?" + OFFICIAL_FORMAT_SUFFIX
    assert OFFICIAL_FORMAT_SUFFIX.startswith("\nExample Output Format:\n        For a real image: \"This is a real "
                                             "image. [Explanation summarizing common realistic features")
    assert "For a fake image: \"This is a fake image. [" in OFFICIAL_FORMAT_SUFFIX
    with pytest.raises(ValueError, match="detection prompt style"):
        detection_prompt(q, "chatty")


def test_diga_teacher_prompts():
    short = diga_teacher_prompt("a cat {on} a sofa", "short")
    assert short.startswith("You are a forensic image analyst.") and '"a cat {on} a sofa"' in short
    official = diga_teacher_prompt("a cat", "official")
    assert official.startswith('Act as a forensic image analyst. The image was generated for the prompt: "a cat".')
    assert official.endswith("limit the output to only the most critical 2-3 points.")
    assert official.count("\n                        ") == 3  # the official f-string's continuation lines
    with pytest.raises(ValueError, match="DIGA prompt style"):
        diga_teacher_prompt("a cat", "long")


def test_presets_and_packing_use_the_configured_diga_prompt(tok):
    from unigendet.data.packing import ImageItem, PackingConfig, SamplePlan, plan_diga_teacher
    from unigendet.train.config import load_config

    assert load_config("tiny").diga_prompt == "short"
    assert load_config("bagel-7b-mot").diga_prompt == "official"
    student = SamplePlan("gen", "g0", "/x.png", (64, 64), [ImageItem("vae", (4, 4), True)], caption="a red kite")
    for style in ("short", "official"):
        cfg = PackingConfig.tiny(diga_prompt=style)
        text_item = plan_diga_teacher(student, tok, cfg).items[1]
        assert tok.decode(text_item.ids) == diga_teacher_prompt("a red kite", style)
    with pytest.raises(ValueError, match="diga_prompt"):
        PackingConfig.tiny(diga_prompt="long")
    with pytest.raises(ValueError, match="diga_prompt"):
        load_config("tiny", ["--diga_prompt=long"])
