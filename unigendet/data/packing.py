"""Sample -> splits -> token-budgeted packs, following BAGEL's ``pack_sequence`` rules.

Split rules (per sample, BAGEL order; ``rope`` is the sample's running RoPE id, starting at 0):

* text: ``<|im_start|>`` + ids + ``<|im_end|>``, mode ``causal``, RoPE ids ``rope, rope+1, ...``; with loss, CE covers
  the positions ``<|im_start|>`` .. last id with labels ids + ``<|im_end|>``.
* ViT image: ``<|vision_start|>`` + N patches + ``<|vision_end|>``, mode ``full``, one shared RoPE id, then +1.
* VAE image: ``<|vision_start|>`` + h*w latents + ``<|vision_end|>``, one shared RoPE id; clean: mode ``full``,
  noise logit -inf, RoPE +1; noisy (flow loss): mode ``noise``, noise logit ~ N(0, 1), RoPE unchanged.

Samples: detection = [VAE clean] [ViT] [question] [answer, CE loss], with the detection head at the answer's
``<|im_start|>``; generation = [caption] (dropped with probability ``text_cond_dropout_prob`` for CFG) [VAE noisy];
DIGA teacher = [VAE clean] [forensic prompt with the caption] [ViT]. The batch is then permuted into
expert-contiguous order (see :mod:`unigendet.data.batch`) and the attention layout is built for that order.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from unigendet.pack import SMSA_MODES, pack_visible_splits
from unigendet.prompts import DIGA_PROMPT_STYLES, diga_teacher_prompt

from .batch import DigaTeacherBatch, PackedBatch
from .transforms import ImageTransform, patchify

__all__ = [
    "ImageItem",
    "PackingConfig",
    "SamplePlan",
    "TextItem",
    "build_diga_batch",
    "build_packed_batch",
    "iter_packs",
    "plan_detection",
    "plan_diga_teacher",
    "plan_generation",
    "weighted_interleave",
]


@dataclass(kw_only=True)
class PackingConfig:
    """Image sizes, token budgets and the sample mix.

    ``gen_weight : det_weight`` is the generation : detection sample ratio (the paper states 1:1, the released
    configs use 1:5). A pack is emitted once it holds ``expected_num_tokens``; it never exceeds ``max_num_tokens``;
    samples longer than ``max_num_tokens_per_sample`` are skipped.
    """

    vit: ImageTransform
    vae: ImageTransform
    vit_max_patches_per_side: int
    max_latent_size: int
    expected_num_tokens: int
    max_num_tokens: int
    max_num_tokens_per_sample: int
    gen_weight: int = 1
    det_weight: int = 1
    text_cond_dropout_prob: float = 0.1
    det_use_vae: bool = True
    diga: bool = False
    #: the DIGA teacher's forensic prompt (see :mod:`unigendet.prompts`)
    diga_prompt: str = "short"
    max_buffer: int = 50
    #: the SMSA mode of the one attention layout every pack carries (:mod:`unigendet.pack.visibility`)
    smsa: str = "reference"

    def __post_init__(self):
        if not (0 < self.max_num_tokens_per_sample <= self.max_num_tokens):
            raise ValueError("max_num_tokens_per_sample must be in (0, max_num_tokens]")
        if not (0 < self.expected_num_tokens <= self.max_num_tokens):
            raise ValueError("expected_num_tokens must be in (0, max_num_tokens]")
        if self.gen_weight < 0 or self.det_weight < 0 or self.gen_weight + self.det_weight == 0:
            raise ValueError("gen_weight and det_weight must be >= 0 and not both 0")
        if not 0.0 <= self.text_cond_dropout_prob <= 1.0:
            raise ValueError("text_cond_dropout_prob must be in [0, 1]")
        if self.vit_max_patches_per_side < self.vit.max_size // self.vit.stride:
            raise ValueError("vit_max_patches_per_side must be >= vit.max_size // vit.stride")
        if self.max_latent_size < self.vae.max_size // self.vae.stride:
            raise ValueError("max_latent_size must be >= vae.max_size // vae.stride")
        if self.smsa not in SMSA_MODES:
            raise ValueError(f"smsa must be one of {SMSA_MODES}, got {self.smsa!r}")
        if self.diga_prompt not in DIGA_PROMPT_STYLES:
            raise ValueError(f"diga_prompt must be one of {DIGA_PROMPT_STYLES}, got {self.diga_prompt!r}")

    @property
    def vit_patch(self) -> int:
        return self.vit.stride

    @classmethod
    def bagel(cls, **kw) -> PackingConfig:
        """BAGEL/UniGenDet sizes: ViT 980/224/14, VAE 1024/512/16, packs of 32k-36k tokens."""
        args = dict(
            vit=ImageTransform(980, 224, 14, 2_007_040),
            vae=ImageTransform(1024, 512, 16),
            vit_max_patches_per_side=70,
            max_latent_size=64,
            expected_num_tokens=32768,
            max_num_tokens=36864,
            max_num_tokens_per_sample=16384,
        )
        args.update(kw)
        return cls(**args)

    @classmethod
    def tiny(cls, **kw) -> PackingConfig:
        """Small sizes for CPU runs: ViT 56/28/14, VAE 64/32/16, packs of 512-640 tokens."""
        args = dict(
            vit=ImageTransform(56, 28, 14),
            vae=ImageTransform(64, 32, 16),
            vit_max_patches_per_side=4,
            max_latent_size=4,
            expected_num_tokens=512,
            max_num_tokens=640,
            max_num_tokens_per_sample=512,
        )
        args.update(kw)
        return cls(**args)


@dataclass
class TextItem:
    ids: list[int]
    loss: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.ids) + 2


@dataclass
class ImageItem:
    kind: str  # "vit" | "vae"
    grid: tuple[int, int]  # (rows, cols) of patches / latent patches
    noisy: bool = False

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] + 2


@dataclass
class SamplePlan:
    """A sample before its image is decoded: split items, token count and everything random already drawn."""

    kind: str  # "det" | "gen" | "diga"
    id: str
    image: str  # image path
    size: tuple[int, int]  # (width, height) of the source image
    items: list
    label: int | None = None
    caption: str | None = None
    noise_seed: tuple[int, ...] = ()  # seeds the N(0, 1) noise logits of noisy VAE images

    @property
    def num_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items)


def _image_items(cfg: PackingConfig, size, *, vae: bool, vit: bool, noisy: bool = False) -> dict:
    out = {}
    if vae:
        out["vae"] = ImageItem("vae", cfg.vae.grid_for(*size), noisy)
    if vit:
        out["vit"] = ImageItem("vit", cfg.vit.grid_for(*size))
    return out


def plan_detection(record, tokenizer, cfg: PackingConfig, size: tuple[int, int]) -> SamplePlan:
    """[text before <image>] [VAE clean] [ViT] [question] [answer with CE loss] for a FakeClue record."""
    prefix, _, suffix = record.question.partition("<image>")
    imgs = _image_items(cfg, size, vae=cfg.det_use_vae, vit=True)
    items: list = []
    if prefix.strip():
        items.append(TextItem(tokenizer.encode(prefix)))
    if cfg.det_use_vae:
        items.append(imgs["vae"])
    items.append(imgs["vit"])
    if suffix.strip():
        items.append(TextItem(tokenizer.encode(suffix)))
    items.append(TextItem(tokenizer.encode(record.answer), loss=True))
    return SamplePlan("det", record.id, record.image, tuple(size), items, label=int(record.label))


def plan_generation(
    record, tokenizer, cfg: PackingConfig, size: tuple[int, int], rng: np.random.Generator
) -> SamplePlan:
    """[caption, causal] [VAE noisy, flow loss]; the caption is dropped with ``cfg.text_cond_dropout_prob``."""
    items: list = []
    if not rng.random() < cfg.text_cond_dropout_prob:
        items.append(TextItem(tokenizer.encode(record.prompt)))
    items.append(_image_items(cfg, size, vae=True, vit=False, noisy=True)["vae"])
    seed = tuple(int(x) for x in rng.integers(0, 2**31 - 1, size=2))
    return SamplePlan("gen", record.id, record.image, tuple(size), items, caption=record.prompt, noise_seed=seed)


def plan_diga_teacher(student: SamplePlan, tokenizer, cfg: PackingConfig) -> SamplePlan:
    """[VAE clean, full] [forensic prompt including the caption, causal] [ViT, full] for a generation sample."""
    imgs = _image_items(cfg, student.size, vae=True, vit=True)
    prompt = diga_teacher_prompt(student.caption or "", cfg.diga_prompt)
    items = [imgs["vae"], TextItem(tokenizer.encode(prompt)), imgs["vit"]]
    return SamplePlan("diga", student.id, student.image, student.size, items, caption=student.caption)


# --------------------------------------------------------------------------------------------------
# Building a packed batch
# --------------------------------------------------------------------------------------------------


@dataclass
class _Acc:
    """BAGEL-order accumulators (positions are old, i.e. BAGEL-order, positions)."""

    pos: int = 0
    position_ids: list = field(default_factory=list)
    is_gen: list = field(default_factory=list)
    splits: list = field(default_factory=list)
    split_kinds: list = field(default_factory=list)
    sample_lens: list = field(default_factory=list)
    text_ids: list = field(default_factory=list)
    text_idx: list = field(default_factory=list)
    ce_idx: list = field(default_factory=list)
    ce_labels: list = field(default_factory=list)
    det_idx: list = field(default_factory=list)
    det_labels: list = field(default_factory=list)
    vit_patches: list = field(default_factory=list)
    vit_idx: list = field(default_factory=list)
    vit_pos: list = field(default_factory=list)
    vit_lens: list = field(default_factory=list)
    vit_grids: list = field(default_factory=list)
    vae_images: list = field(default_factory=list)
    vae_grids: list = field(default_factory=list)
    vae_idx: list = field(default_factory=list)
    vae_pos: list = field(default_factory=list)
    vae_img_of_tok: list = field(default_factory=list)
    vae_noise: list = field(default_factory=list)
    mse_idx: list = field(default_factory=list)

    def text_token(self, tok_id: int, rope: int) -> None:
        self.text_ids.append(tok_id)
        self.text_idx.append(self.pos)
        self.position_ids.append(rope)
        self.is_gen.append(False)
        self.pos += 1


def _grid_pos_ids(grid: tuple[int, int], max_per_side: int) -> list[int]:
    rows, cols = grid
    return (np.arange(rows)[:, None] * max_per_side + np.arange(cols)[None, :]).reshape(-1).tolist()


def _add_sample(acc: _Acc, plan: SamplePlan, images: dict, tokenizer, cfg: PackingConfig) -> list[int]:
    """Append one sample's splits; returns the indexes (into acc.vae_images) of its VAE images."""
    start = acc.pos
    rope = 0
    splits, kinds = [], []  # per split: (length, attention mode) and its token kind (unigendet.pack)
    vae_ids = []
    for it in plan.items:
        s0 = acc.pos
        if isinstance(it, TextItem):
            if it.loss:
                acc.ce_idx.extend(range(acc.pos, acc.pos + len(it.ids) + 1))
                acc.ce_labels.extend([*it.ids, tokenizer.im_end_id])
                if plan.kind == "det":
                    acc.det_idx.append(acc.pos)
                    acc.det_labels.append(plan.label)
            for k, t in enumerate([tokenizer.im_start_id, *it.ids, tokenizer.im_end_id]):
                acc.text_token(t, rope + k)
            rope += len(it.ids) + 2
            splits.append((acc.pos - s0, "causal"))
            kinds.append("answer" if it.loss and plan.kind == "det" else "text")
        elif it.kind == "vit":
            img = images["vit"]
            if (img.shape[1] // cfg.vit_patch, img.shape[2] // cfg.vit_patch) != it.grid:
                raise ValueError(f"vit image {tuple(img.shape)} does not match the planned grid {it.grid}")
            n = it.grid[0] * it.grid[1]
            acc.text_token(tokenizer.vision_start_id, rope)
            acc.vit_patches.append(patchify(img, cfg.vit_patch))
            acc.vit_idx.extend(range(acc.pos, acc.pos + n))
            acc.vit_pos.extend(_grid_pos_ids(it.grid, cfg.vit_max_patches_per_side))
            acc.vit_lens.append(n)
            acc.vit_grids.append(it.grid)
            acc.position_ids.extend([rope] * n)
            acc.is_gen.extend([False] * n)
            acc.pos += n
            acc.text_token(tokenizer.vision_end_id, rope)
            rope += 1
            splits.append((n + 2, "full"))
            kinds.append("vit")
        else:  # vae
            img = images["vae"]
            stride = cfg.vae.stride
            if (img.shape[1] // stride, img.shape[2] // stride) != it.grid:
                raise ValueError(f"vae image {tuple(img.shape)} does not match the planned grid {it.grid}")
            n = it.grid[0] * it.grid[1]
            img_id = len(acc.vae_images)
            vae_ids.append(img_id)
            acc.text_token(tokenizer.vision_start_id, rope)
            acc.vae_images.append(img)
            acc.vae_grids.append(it.grid)
            acc.vae_idx.extend(range(acc.pos, acc.pos + n))
            acc.vae_pos.extend(_grid_pos_ids(it.grid, cfg.max_latent_size))
            acc.vae_img_of_tok.extend([img_id] * n)
            if it.noisy:
                acc.mse_idx.extend(range(acc.pos, acc.pos + n))
                g = np.random.default_rng(list(plan.noise_seed) + [img_id])
                acc.vae_noise.append(float(g.standard_normal()))
            else:
                acc.vae_noise.append(-math.inf)
            acc.position_ids.extend([rope] * n)
            acc.is_gen.extend([True] * n)
            acc.pos += n
            acc.text_token(tokenizer.vision_end_id, rope)
            if not it.noisy:
                rope += 1
            splits.append((n + 2, "noise" if it.noisy else "full"))
            kinds.append("gen")
    acc.splits.append(splits)
    acc.split_kinds.append(kinds)
    acc.sample_lens.append(acc.pos - start)
    return vae_ids


def _i64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.int64).reshape(-1))


def build_packed_batch(
    plans: list[SamplePlan],
    images: list[dict],
    tokenizer,
    cfg: PackingConfig,
    *,
    build_layout: bool = True,
    batch_cls=PackedBatch,
    **extra,
) -> PackedBatch:
    """Pack samples (BAGEL order), permute to expert-contiguous order and build the attention layout.

    Args:
        plans: the samples' plans. images: per sample ``{"vit": (3, H, W), "vae": (3, H', W')}`` float32 in
            [-1, 1] (only the kinds the plan uses).
    """
    if len(plans) != len(images):
        raise ValueError(f"plans and images must have the same length, got {len(plans)} and {len(images)}")
    acc = _Acc()
    for plan, imgs in zip(plans, images):
        _add_sample(acc, plan, imgs, tokenizer, cfg)
    total = acc.pos
    is_gen = np.asarray(acc.is_gen, dtype=bool)
    old = np.arange(total, dtype=np.int64)
    order = np.concatenate([old[~is_gen], old[is_gen]])
    inv = np.empty(total, dtype=np.int64)
    inv[order] = old

    def remap(idx):
        return _i64(inv[np.asarray(idx, dtype=np.int64)] if len(idx) else [])

    layout = None
    if build_layout:  # the pack's one layout, under the configured SMSA mode
        from unigendet.ops.layout import AttentionLayout

        visible = pack_visible_splits(acc.splits, acc.split_kinds, [p.kind for p in plans], smsa=cfg.smsa)
        layout = AttentionLayout.from_splits(acc.splits, order=order, visible=visible)
    vit_cu = np.concatenate([[0], np.cumsum(acc.vit_lens)]).astype(np.int32)
    patch_dim = 3 * cfg.vit_patch * cfg.vit_patch
    return batch_cls(
        seq_len=total,
        num_und=int((~is_gen).sum()),
        order=torch.from_numpy(order),
        sample_lens=acc.sample_lens,
        splits=acc.splits,
        split_kinds=acc.split_kinds,
        smsa=cfg.smsa,
        position_ids=_i64(np.asarray(acc.position_ids, dtype=np.int64)[order] if total else []),
        layout=layout,
        text_ids=_i64(acc.text_ids),
        text_indexes=remap(acc.text_idx),
        ce_indexes=remap(acc.ce_idx),
        ce_labels=_i64(acc.ce_labels),
        det_indexes=remap(acc.det_idx),
        det_labels=_i64(acc.det_labels),
        vit_patches=torch.cat(acc.vit_patches) if acc.vit_patches else torch.zeros(0, patch_dim),
        vit_indexes=remap(acc.vit_idx),
        vit_position_ids=_i64(acc.vit_pos),
        vit_cu_seqlens=torch.from_numpy(vit_cu),
        vit_max_seqlen=max(acc.vit_lens, default=0),
        vit_grids=acc.vit_grids,
        vae_images=acc.vae_images,
        vae_latent_grids=acc.vae_grids,
        vae_indexes=remap(acc.vae_idx),
        vae_position_ids=_i64(acc.vae_pos),
        vae_image_of_token=_i64(acc.vae_img_of_tok),
        vae_noise_logit=torch.tensor(acc.vae_noise, dtype=torch.float32),
        mse_indexes=remap(acc.mse_idx),
        sample_kind=[p.kind for p in plans],
        sample_ids=[p.id for p in plans],
        **extra,
    )


def build_diga_batch(
    student_plans: list[SamplePlan], images: list[dict], student: PackedBatch, tokenizer, cfg: PackingConfig,
    *, build_layout: bool = True,
) -> DigaTeacherBatch | None:
    """The DIGA teacher pack for the generation samples of ``student`` (``images`` as for the student, plus
    ``"vit"`` for every generation sample). None when the student pack has no generation sample."""
    teacher_plans, teacher_images, student_ids, student_grids = [], [], [], []
    vae_cursor = 0
    for plan, imgs in zip(student_plans, images):
        n_vae = sum(1 for it in plan.items if isinstance(it, ImageItem) and it.kind == "vae")
        if plan.kind == "gen":
            teacher_plans.append(plan_diga_teacher(plan, tokenizer, cfg))
            teacher_images.append({"vae": imgs["vae"], "vit": imgs["vit"]})
            student_ids.append(vae_cursor)
            student_grids.append(student.vae_latent_grids[vae_cursor])
        vae_cursor += n_vae
    if not teacher_plans:
        return None
    t = build_packed_batch(
        teacher_plans, teacher_images, tokenizer, cfg, build_layout=build_layout, batch_cls=DigaTeacherBatch,
        student_image_ids=_i64(student_ids), student_grids=student_grids,
    )
    t.teacher_grids = list(t.vit_grids)
    t.teacher_vit_indexes = t.vit_indexes.clone()
    return t


# --------------------------------------------------------------------------------------------------
# Mixing and token-budgeted packing
# --------------------------------------------------------------------------------------------------


def weighted_interleave(streams: dict[str, Iterator], weights: dict[str, int]) -> Iterator[tuple[str, object]]:
    """Smooth weighted round-robin over ``streams`` (deterministic; exact ratio over every full cycle).

    A stream that ends is dropped and the others continue.
    """
    live = {k: iter(s) for k, s in streams.items() if weights.get(k, 0) > 0}
    current = dict.fromkeys(live, 0)
    while live:
        total = sum(weights[k] for k in live)
        for k in live:
            current[k] += weights[k]
        k = max(live, key=lambda n: (current[n], -list(live).index(n)))
        current[k] -= total
        try:
            yield k, next(live[k])
        except StopIteration:
            del live[k]
            del current[k]


def iter_packs(samples: Iterable[SamplePlan], cfg: PackingConfig, skipped: dict | None = None
               ) -> Iterator[list[SamplePlan]]:
    """Group samples into packs of ``expected_num_tokens`` .. ``max_num_tokens`` tokens (BAGEL's buffer rule).

    A sample that would overflow the current pack waits in a buffer (at most ``max_buffer`` samples; buffered
    samples are preferred whenever they fit); when the buffer is full the pack is emitted early. Samples over
    ``max_num_tokens_per_sample`` are skipped (counted in ``skipped["too_many_tokens"]``). When ``samples`` ends the
    remaining pack and buffer are flushed, so every accepted sample is emitted exactly once.
    """
    cur: list[SamplePlan] = []
    curr = 0
    buffer: deque[SamplePlan] = deque()

    def fill_from_buffer():
        nonlocal curr
        i = 0
        while i < len(buffer) and curr < cfg.expected_num_tokens:
            s = buffer[i]
            if curr + s.num_tokens <= cfg.max_num_tokens:
                del buffer[i]
                cur.append(s)
                curr += s.num_tokens
            else:
                i += 1

    for s in samples:
        n = s.num_tokens
        if n > cfg.max_num_tokens_per_sample:
            if skipped is not None:
                skipped["too_many_tokens"] = skipped.get("too_many_tokens", 0) + 1
            continue
        if curr + n <= cfg.max_num_tokens:
            cur.append(s)
            curr += n
        elif len(buffer) < cfg.max_buffer:
            buffer.append(s)
        else:
            yield cur
            cur, curr = [s], n
        fill_from_buffer()
        if curr >= cfg.expected_num_tokens:
            yield cur
            cur, curr = [], 0
            fill_from_buffer()
    while cur or buffer:
        fill_from_buffer()
        if not cur:  # the buffer head alone overflows nothing; start a pack with it
            s = buffer.popleft()
            cur, curr = [s], s.num_tokens
            fill_from_buffer()
        # pack as much of the buffer as fits, then emit
        i = 0
        while i < len(buffer):
            if curr + buffer[i].num_tokens <= cfg.max_num_tokens:
                s = buffer[i]
                del buffer[i]
                cur.append(s)
                curr += s.num_tokens
            else:
                i += 1
        yield cur
        cur, curr = [], 0
