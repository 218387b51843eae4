"""Every prompt text of the project, defined once.

Detection (the text placed after the image; the answer is decoded after it):

* ``fakeclue``: FakeClue's human turn without the ``<image>`` placeholder, ``"Does the image looks real/fake?"``,
  i.e. exactly what every detection sample is trained with;
* ``official``: the official evaluation's prompt (UniGenDet ``eval/det/fakevlm_test.py``): the same question,
  stripped, followed by an "Example Output Format" block that spells out the two answer openings. The published
  detection numbers were measured with it.

DIGA teacher (the text between the VAE and the ViT image of the frozen detector's pass; ``{caption}`` is the
generation sample's caption):

* ``short``: this project's short forensic prompt, used by the tiny preset (its tokenizer is trained on it);
* ``official``: the prompt of the official DIGA implementation (``modeling/bagel/bagel_generation_diga.py``),
  byte for byte, the default of the ``bagel-7b-mot`` preset.
"""

from __future__ import annotations

__all__ = [
    "DETECTION_PROMPT_STYLES",
    "DIGA_PROMPT_STYLES",
    "FAKECLUE_QUESTION",
    "IMAGE_PLACEHOLDER",
    "OFFICIAL_FORMAT_SUFFIX",
    "detection_prompt",
    "diga_teacher_prompt",
]

IMAGE_PLACEHOLDER = "<image>"

#: FakeClue's human turn: the image, then the question.
FAKECLUE_QUESTION = IMAGE_PLACEHOLDER + "Does the image looks real/fake?"

#: Appended to the question by the official detection evaluation (kept verbatim, indentation included).
OFFICIAL_FORMAT_SUFFIX = (
    "\nExample Output Format:\n"
    "        For a real image: \"This is a real image. [Explanation summarizing common realistic features, such as "
    "clear outlines, organized objects, realistic shadows, and aligned roads.]\"\n"
    "        For a fake image: \"This is a fake image. [Explanation summarizing common unrealistic features, such as "
    "blurry outlines, disorganized objects, unrealistic shadows, and misaligned roads.]\"\n"
)

DETECTION_PROMPT_STYLES = ("fakeclue", "official")

_DIGA_PROMPTS = {
    "short": (
        "You are a forensic image analyst. The image is described as: \"{caption}\". List the visual evidence of "
        "authenticity you can see: sensor noise, lighting, shadows, edges, gradients and textures."
    ),
    # The official text is a triple-quoted f-string whose continuation lines carry 24 spaces of indentation.
    "official": (
        "Act as a forensic image analyst. The image was generated for the prompt: \"{caption}\".\n"
        "                        Briefly and professionally state the specific visual evidence that supports the "
        "image's authenticity.\n"
        "                        For each point, concisely link it to a prompt element (e.g., \u201c<element>: "
        "<visual evidence>\u201d).\n"
        "                        Use very brief, factual language and limit the output to only the most critical "
        "2-3 points."
    ),
}

DIGA_PROMPT_STYLES = tuple(_DIGA_PROMPTS)


def detection_prompt(question: str | None = None, style: str = "fakeclue") -> str:
    """The text after the image for a FakeClue human turn ``question`` (default :data:`FAKECLUE_QUESTION`).

    ``fakeclue``: the text after the ``<image>`` placeholder, unchanged (what training encodes); ``official``: the
    question with the placeholder removed and stripped, then :data:`OFFICIAL_FORMAT_SUFFIX`.
    """
    q = FAKECLUE_QUESTION if question is None else question
    if style == "fakeclue":
        return q.partition(IMAGE_PLACEHOLDER)[2] if IMAGE_PLACEHOLDER in q else q
    if style == "official":
        return q.replace(IMAGE_PLACEHOLDER, "").strip() + OFFICIAL_FORMAT_SUFFIX
    raise ValueError(f"detection prompt style must be one of {DETECTION_PROMPT_STYLES}, got {style!r}")


def diga_teacher_prompt(caption: str, style: str = "short") -> str:
    """The DIGA teacher's forensic prompt for a generation sample's ``caption``."""
    try:
        template = _DIGA_PROMPTS[style]
    except KeyError:
        raise ValueError(f"DIGA prompt style must be one of {DIGA_PROMPT_STYLES}, got {style!r}") from None
    return template.replace("{caption}", caption)
