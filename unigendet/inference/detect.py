"""Detection inference: batched packed prefill, then incremental decoding with a static KV cache.

The input of one image is packed exactly as in training (``unigendet.data.packing.plan_detection``): the clean VAE
latent tokens (generation expert), the ViT tokens, the question, and then the answer, which opens with
``<|im_start|>``. The detection head reads the final hidden state of that ``<|im_start|>`` token, i.e. decode
step 0, and the answer is decoded from there until ``<|im_end|>`` or the token limit.

Several images are prefilled as the samples of ONE packed forward (the attention layout keeps them apart and
applies the configured SMSA rule). While the prefill runs, each layer's post-RoPE keys and values of the tokens
the answer may see are copied into a :class:`~unigendet.inference.kv_cache.StaticKVCache`. Each decoding step then
embeds one token per image, runs it through the understanding expert of every layer (text tokens always belong to
that expert), writes its key/value into the cache in place and attends over the image's cached prefix. RoPE
positions continue from the prefill.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from unigendet.eval.metrics import FAKE_PHRASE, REAL_PHRASE, parse_verdict
from unigendet.pack import SMSA_MODES, answer_visible_splits
from unigendet.prompts import FAKECLUE_QUESTION, detection_prompt
from unigendet.sampling import SamplingConfig, decode_tokens

from .kv_cache import StaticKVCache

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_QUESTION",
    "DetectionResult",
    "Detector",
    "decode_answers",
    "detection_plan",
    "split_explanation",
]

#: FakeClue's question, the default prompt after the image (see :mod:`unigendet.prompts` for every prompt).
DEFAULT_QUESTION = detection_prompt(FAKECLUE_QUESTION, "fakeclue")
#: The official evaluation's answer length limit; decoding stops earlier at ``<|im_end|>``.
DEFAULT_MAX_NEW_TOKENS = 1000


@dataclass
class DetectionResult:
    """One image's verdict.

    Attributes:
        label: detection-head verdict, 0 = fake, 1 = real (arg-max of ``logits``).
        prob_fake: detection-head softmax probability of "fake".
        text: the decoded answer (special tokens removed).
        text_label: verdict parsed from ``text`` (0 fake, 1 real, -1 unparseable).
        explanation: ``text`` without its leading verdict sentence.
        logits: the two detection-head logits ``(fake, real)``.
        num_tokens: decoded tokens, ``<|im_end|>`` excluded.
        finished: whether the answer ended with ``<|im_end|>`` (``False``: cut at the token limit).
        source: the image path, when a path was given.
        error: why the image could not be used (``Detector.detect(skip_unreadable=True)``); the other fields then
            hold no verdict (``label`` and ``text_label`` -1, ``prob_fake`` NaN).
    """

    label: int
    prob_fake: float
    text: str
    text_label: int
    explanation: str
    logits: tuple[float, float] = (0.0, 0.0)
    num_tokens: int = 0
    finished: bool = False
    source: str | None = None
    error: str | None = None

    @classmethod
    def failed(cls, source: str | None, error: str) -> DetectionResult:
        """The result of an image that could not be read."""
        return cls(label=-1, prob_fake=math.nan, text="", text_label=-1, explanation="", source=source, error=error)

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["prob_fake"], float) and math.isnan(d["prob_fake"]):
            d["prob_fake"] = None  # strict JSON
        return d


def split_explanation(text: str) -> str:
    """The answer without its verdict sentence (``"This is a fake image."``); the whole text if it has none."""
    low = text.lower()
    for phrase in (REAL_PHRASE, FAKE_PHRASE):
        i = low.find(phrase)
        if i >= 0:
            return text[i + len(phrase):].lstrip(" .,:;!\n\t").strip()
    return text.strip()


# --------------------------------------------------------------------------------------------------
# Building the prefill pack
# --------------------------------------------------------------------------------------------------


def _load_image(image) -> tuple[Image.Image, str | None]:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image, None
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from unigendet.data.readers import load_rgb

        path = str(image if not isinstance(image, bytes) else image.decode())
        img = load_rgb(path, strict=True)
        return img, path
    raise ValueError(f"images must be paths or PIL images, got {type(image).__name__}")


def detection_plan(
    image: Image.Image,
    question_ids: Sequence[int],
    packing,
    *,
    use_vae: bool = True,
    answer_ids: Sequence[int] | None = None,
    ident: str = "",
):
    """The plan and transformed images of one detection sample: ``[VAE clean] [ViT] [question] ([answer])``.

    With ``answer_ids`` the answer split (``<|im_start|>`` + ids + ``<|im_end|>``, CE loss, detection head at its
    ``<|im_start|>``) is appended, which gives the full-sequence form of a decoded answer; without it the pack is
    the prefill, and the answer is decoded from the cache.

    Returns:
        ``(SamplePlan, {"vae": (3, H, W), "vit": (3, H', W')})``.
    """
    from unigendet.data.packing import ImageItem, SamplePlan, TextItem
    from unigendet.data.transforms import pil_to_tensor

    size = image.size
    x = pil_to_tensor(image)
    items: list = []
    imgs = {}
    if use_vae:
        items.append(ImageItem("vae", packing.vae.grid_for(*size)))
        imgs["vae"] = packing.vae(x)
    items.append(ImageItem("vit", packing.vit.grid_for(*size)))
    imgs["vit"] = packing.vit(x)
    if question_ids:
        items.append(TextItem(list(question_ids)))
    if answer_ids is not None:
        items.append(TextItem(list(answer_ids), loss=True))
    return SamplePlan("det", ident, ident, tuple(size), items, label=0 if answer_ids is not None else None), imgs


def _prefix_tokens(batch, smsa_mode: str) -> tuple[list[np.ndarray], list[int]]:
    """Per sample: batch positions of the tokens its answer sees, and the answer's first RoPE position.

    Which splits the answer sees is :func:`unigendet.pack.answer_visible_splits` (BAGEL's prefix rule under the
    SMSA mode): the decoder's cache holds exactly those tokens.
    """
    s = int(batch.seq_len)
    order = batch.order.cpu().numpy().astype(np.int64)
    new_of_old = np.empty(s, dtype=np.int64)
    new_of_old[order] = np.arange(s)
    pos_ids = batch.position_ids.cpu().numpy()
    kept, next_pos = [], []
    off = 0
    for si, sample in enumerate(batch.splits):
        starts = np.cumsum([0] + [length for length, _ in sample]) + off
        det = si < len(batch.sample_kind) and batch.sample_kind[si] == "det"
        seen = answer_visible_splits([m for _, m in sample], batch.split_kinds[si], detection=det, smsa=smsa_mode)
        parts = [new_of_old[starts[i] : starts[i + 1]] for i in seen]
        kept.append(np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64))
        whole = new_of_old[off : starts[-1]]
        next_pos.append(int(pos_ids[whole].max()) + 1 if whole.size else 0)
        off = int(starts[-1])
    return kept, next_pos


class _PrefillAttention:
    """The prefill's attention callable: stores each layer's keys/values into the cache, then attends."""

    def __init__(self, layout, cache: StaticKVCache, src: torch.Tensor, dst: torch.Tensor):
        self.layout, self.cache, self.src, self.dst = layout, cache, src, dst
        self.layer = 0

    def __call__(self, q, k, v):
        from unigendet.ops import packed_attention

        self.cache.fill(self.layer, k.index_select(0, self.src), v.index_select(0, self.src), self.dst)
        self.layer += 1
        return packed_attention(q, k, v, self.layout)


def _decode_step(model, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One token per sequence through the understanding expert of every layer -> final-normed ``(B, hidden)``."""
    from unigendet.models.qwen2_mot import apply_rope, rope_cos_sin

    dec = model.language_model.model
    cfg = dec.config
    h = dec.embed_tokens(tokens)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
    cache.begin_step()
    for i, layer in enumerate(dec.layers):
        a = layer.self_attn
        q, k, v = a.qkv(layer.input_layernorm(h), gen=False)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        cache.write(i, k, v)
        o = cache.attend(i, q).flatten(1)
        h = h + a.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    cache.end_step()
    return dec.norm(h)


@torch.no_grad()
def decode_answers(
    model,
    batch,
    *,
    start_token_id: int,
    eos_token_id: int,
    max_new_tokens: int,
    smsa_mode: str = "reference",
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    history: Sequence[Sequence[int]] | None = None,
    check_every: int = 8,
    return_logits: bool = False,
) -> dict:
    """Prefill a host-side detection pack in one forward, then decode every sample's answer with a static cache.

    Args:
        model: a :class:`~unigendet.models.UniGenDet`.
        batch: a host :class:`~unigendet.data.PackedBatch` whose samples end before the answer (the prefill).
        start_token_id: the answer opening (``<|im_start|>``), fed at decode step 0.
        eos_token_id: ``<|im_end|>``; a sample stops there (later positions repeat it).
        max_new_tokens: decoded tokens per sample at most.
        smsa_mode: ``reference``, ``paper`` or ``off`` (see :mod:`unigendet.models.smsa`).
        sampling: decoding settings (default greedy).
        generator: RNG on the model's device for VAE posterior sampling and token sampling.
        history: per sample, prompt ids that count for the repetition penalty (the start token always counts).
        check_every: test for "every sample finished" every this many steps (one host sync each time).
        return_logits: also return the per-step next-token logits.

    Returns:
        dict with ``tokens`` (list per sample of decoded ids, ``<|im_end|>`` excluded), ``finished`` (list of
        bool), ``det_logits`` (B, 2) float32 CPU, and with ``return_logits`` ``step_logits`` (B, T, V) float32 CPU
        (``T`` steps run; step ``s`` predicts token ``s + 1`` of the answer).
    """
    from unigendet.models.smsa import smsa_layout

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling or SamplingConfig.greedy()
    dev = model.device
    dec = model.language_model.model
    cfg = dec.config
    n = len(batch.splits)

    kept, next_pos = _prefix_tokens(batch, smsa_mode)
    prefix = [int(k.size) for k in kept]
    cache = StaticKVCache(
        len(dec.layers), [p + max_new_tokens for p in prefix], cfg.num_key_value_heads, cfg.head_dim,
        dtype=model.dtype, device=dev,
    )
    src = torch.from_numpy(np.concatenate(kept)).to(dev)
    dst = torch.cat([torch.arange(b, b + p, dtype=torch.int64) for b, p in zip(cache.base_host, prefix)]).to(dev)
    layout = smsa_layout(batch, smsa_mode, device=dev)
    db = batch.to(dev)

    emb = model.embed(db, generator=generator)
    attn = _PrefillAttention(layout, cache, src, dst)
    dec(emb["h_und"], emb["h_gen"], db.position_ids, attn, final_norm=False)
    if attn.layer != len(dec.layers):
        raise RuntimeError(f"prefill stored {attn.layer} layers of keys, expected {len(dec.layers)}")
    cache.set_prefix_lengths(prefix)
    del emb

    hist = None
    if history is not None and sampling.repetition_penalty != 1.0:  # prompt ids, -1 = ignored padding
        width = max(len(history[i]) for i in range(n))
        hist = torch.full((n, width), -1, dtype=torch.int64)
        for i in range(n):
            hist[i, : len(history[i])] = torch.tensor(list(history[i]), dtype=torch.int64)

    positions = torch.tensor(next_pos, dtype=torch.int64, device=dev)
    step_logits: list[torch.Tensor] = []
    state = {"step": 0, "det_logits": None}

    def step(tokens):
        h = _decode_step(model, cache, tokens, positions + state["step"])
        if state["step"] == 0:  # the det head reads the state of step 0 (the reference's logits output)
            state["det_logits"] = model.fake_cls_head(h).float()
        state["step"] += 1
        logits = model.language_model.lm_head(h).float()
        if return_logits:
            step_logits.append(logits)
        return logits

    start = torch.full((n,), start_token_id, dtype=torch.int64, device=dev)
    out = decode_tokens(step, start, sampling, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                        history=hist, generator=generator, check_every=check_every)
    det_logits = state["det_logits"]

    out_host = out.cpu().tolist()
    toks, finished = [], []
    for row in out_host:
        if eos_token_id in row:
            toks.append(row[: row.index(eos_token_id)])
            finished.append(True)
        else:
            toks.append(row)
            finished.append(False)
    res = {"tokens": toks, "finished": finished, "det_logits": det_logits.cpu()}
    if return_logits:
        res["step_logits"] = torch.stack(step_logits, 1).cpu()
    return res


# --------------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------------


class Detector:
    """Real/fake verdicts with explanations for a list of images.

    Args:
        model: a :class:`~unigendet.models.UniGenDet` (in eval mode while detecting; its mode is restored).
        tokenizer: a :class:`unigendet.tokenizer.Tokenizer`.
        packing: the :class:`~unigendet.data.PackingConfig` the model was trained with (image sizes).
        smsa: SMSA rule (``reference``, ``paper``, ``off``); default the model's ``config.smsa_mode``.
        sampling: decoding settings; ``None`` = greedy (``SamplingConfig.paper()`` for the paper's sampling).
        max_new_tokens: answer length limit (decoding stops earlier once every answer reached ``<|im_end|>``).
        question: the question placed after the image (a FakeClue human turn; a ``<image>`` prefix is dropped).
        prompt_style: ``fakeclue`` (the question as trained) or ``official`` (the question followed by the official
            evaluation's output-format block); see :func:`unigendet.prompts.detection_prompt`.
        check_every: decoding steps between two "all finished?" checks (each one host synchronisation).
    """

    def __init__(self, model, tokenizer, packing, *, smsa: str | None = None, sampling: SamplingConfig | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, question: str = DEFAULT_QUESTION,
                 prompt_style: str = "fakeclue", check_every: int = 8):
        mode = smsa if smsa is not None else getattr(model.config, "smsa_mode", "reference")
        if mode not in SMSA_MODES:
            raise ValueError(f"smsa must be one of {SMSA_MODES}, got {mode!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        detection_prompt(question, prompt_style)  # validates the style
        if not model.config.visual_und:
            raise ValueError("model has no ViT (visual_und=False): it cannot detect")
        self.model = model
        self.tokenizer = tokenizer
        # The prefill packs carry their one layout under the detector's SMSA mode (built with the pack).
        self.packing = packing if packing.smsa == mode else dataclasses.replace(packing, smsa=mode)
        self.smsa = mode
        self.sampling = sampling or SamplingConfig.greedy()
        self.max_new_tokens = int(max_new_tokens)
        self.question = question
        self.prompt_style = prompt_style
        self.check_every = int(check_every)

    @property
    def use_vae(self) -> bool:
        return bool(self.packing.det_use_vae and self.model.config.visual_gen and self.model.vae is not None)

    def _question_ids(self, question: str) -> list[int]:
        # The FakeClue human turn is "<image>question": only the text after the image placeholder is encoded.
        text = detection_prompt(question, self.prompt_style)
        return self.tokenizer.encode(text) if text.strip() else []

    def build_prefill(self, images: Sequence[Image.Image], questions: Sequence[str]):
        """The prefill pack (host) of a few images."""
        from unigendet.data.packing import build_packed_batch

        plans, imgs = [], []
        for i, (img, q) in enumerate(zip(images, questions)):
            p, x = detection_plan(img, self._question_ids(q), self.packing, use_vae=self.use_vae, ident=str(i))
            plans.append(p)
            imgs.append(x)
        return build_packed_batch(plans, imgs, self.tokenizer, self.packing)

    @torch.no_grad()
    def detect(
        self,
        images: Sequence[str | Image.Image],
        *,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = True,
        questions: Sequence[str] | None = None,
        skip_unreadable: bool = False,
    ) -> list[DetectionResult]:
        """Detect every image (paths or PIL images), ``batch_size`` images per packed prefill.

        Args:
            seed: seeds the VAE posterior sample and, when sampling, the token draws.
            questions: per-image question (default: ``self.question`` for all; a ``<image>`` prefix is dropped).
            skip_unreadable: an image file that cannot be decoded (missing, a folder, corrupt, truncated) gets a
                :meth:`DetectionResult.failed` result and the others are processed; otherwise it raises
                :class:`unigendet.data.readers.DataError`.
        Returns:
            one :class:`DetectionResult` per image, in order.
        """
        from unigendet._progress import progress_bar
        from unigendet.data.readers import DataError

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images = list(images)
        if questions is not None and len(questions) != len(images):
            raise ValueError(f"questions ({len(questions)}) and images ({len(images)}) differ in length")
        was_training = self.model.training
        self.model.eval()
        gen = torch.Generator(device=self.model.device).manual_seed(int(seed))
        bar = progress_bar(total=len(images), desc="detect", unit="img", disable=not progress)
        results: list[DetectionResult | None] = [None] * len(images)
        try:
            for start in range(0, len(images), batch_size):
                idx, loaded = [], []
                for i in range(start, min(start + batch_size, len(images))):
                    try:
                        loaded.append(_load_image(images[i]))
                        idx.append(i)
                    except DataError as e:
                        if not skip_unreadable:
                            raise
                        results[i] = DetectionResult.failed(str(images[i]), e.describe())
                if idx:
                    qs = [self.question if questions is None else questions[i] for i in idx]
                    self._detect_chunk(idx, loaded, qs, gen, results)
                bar.update(min(batch_size, len(images) - start))
        finally:
            self.model.train(was_training)
            bar.close()
        return results

    def _detect_chunk(self, idx, loaded, qs, gen, results) -> None:
        tok = self.tokenizer
        batch = self.build_prefill([im for im, _ in loaded], qs)
        res = decode_answers(
            self.model, batch, start_token_id=tok.im_start_id, eos_token_id=tok.im_end_id,
            max_new_tokens=self.max_new_tokens, smsa_mode=self.smsa, sampling=self.sampling,
            generator=gen, history=[self._question_ids(q) for q in qs], check_every=self.check_every,
        )
        probs = torch.softmax(res["det_logits"], -1)
        for j, (ids, fin) in enumerate(zip(res["tokens"], res["finished"])):
            text = tok.decode(ids, skip_special_tokens=True).strip()
            logits = res["det_logits"][j].tolist()
            results[idx[j]] = DetectionResult(
                label=int(np.argmax(logits)),
                prob_fake=float(probs[j, 0]),
                text=text,
                text_label=parse_verdict(text),
                explanation=split_explanation(text),
                logits=(float(logits[0]), float(logits[1])),
                num_tokens=len(ids),
                finished=fin,
                source=loaded[j][1],
            )
