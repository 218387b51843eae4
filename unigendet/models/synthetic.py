"""Synthetic packed batches (random pixels and token ids) for model tests and benchmarks.

Builds :class:`unigendet.data.PackedBatch` objects by BAGEL's packing rules (``pack_sequence``) without a
tokenizer or images on disk: detection samples ``[VAE clean] [ViT] [question] [answer]`` and generation samples
``[caption] [VAE noisy]``, optionally with the DIGA teacher pack ``[VAE clean] [prompt] [ViT]`` per generation
image. Token order is expert-contiguous (understanding block first), exactly as the data contract specifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import UniGenDetConfig

__all__ = ["DetSpec", "GenSpec", "SpecialIds", "make_batch"]


@dataclass(kw_only=True)
class SpecialIds:
    im_start: int = 1
    im_end: int = 2
    vision_start: int = 3
    vision_end: int = 4
    first_regular: int = 5


@dataclass(kw_only=True)
class DetSpec:
    """A detection sample: VAE latent grid, ViT patch grid, question and answer lengths, label (0 fake, 1 real).

    ``answer_len=None`` builds a prompt only (no answer split, no detection/CE position), as for inference.
    """

    vae_grid: tuple[int, int]
    vit_grid: tuple[int, int]
    question_len: int = 4
    answer_len: int | None = 5
    label: int = 0


@dataclass(kw_only=True)
class GenSpec:
    """A text-to-image sample: caption length and the target image's latent grid (and ViT grid for DIGA)."""

    vae_grid: tuple[int, int]
    caption_len: int = 4
    vit_grid: tuple[int, int] = (2, 2)
    prompt_len: int = 3


class _Pack:
    """Accumulates one pack in BAGEL order; tokens are (kind, payload) with kind text / vit / vae."""

    def __init__(self, cfg: UniGenDetConfig, special: SpecialIds, gen: torch.Generator):
        self.cfg, self.sp, self.g = cfg, special, gen
        self.kinds: list[str] = []  # per token: "text" | "vit" | "vae"
        self.text_ids: list[int] = []
        self.pos_ids: list[int] = []
        self.ce: list[tuple[int, int]] = []  # (old position, label)
        self.det: list[tuple[int, int]] = []
        self.splits: list[list[tuple[int, str]]] = []
        self.split_kinds: list[list[str]] = []  # per split: unigendet.pack.SPLIT_KINDS
        self.sample_kind: list[str] = []
        self.vit_imgs: list[tuple[torch.Tensor, tuple[int, int], list[int]]] = []  # patches, grid, old positions
        self.vae_imgs: list[tuple[torch.Tensor, tuple[int, int], float, list[int]]] = []
        self.text_old: list[int] = []

    def _rand_ids(self, n: int) -> list[int]:
        lo, hi = self.sp.first_regular, self.cfg.llm.vocab_size
        return torch.randint(lo, hi, (n,), generator=self.g).tolist()

    def _tok(self, kind: str, rope: int, text_id: int | None = None) -> int:
        p = len(self.kinds)
        self.kinds.append(kind)
        self.pos_ids.append(rope)
        if kind == "text":
            self.text_ids.append(text_id)
            self.text_old.append(p)
        return p

    def text(self, n: int, rope: int, loss: bool) -> tuple[int, int, int]:
        ids = self._rand_ids(n)
        seq = [self.sp.im_start, *ids, self.sp.im_end]
        start = None
        for i, tid in enumerate(seq):
            p = self._tok("text", rope + i, tid)
            start = p if start is None else start
            if loss and i < len(seq) - 1:
                self.ce.append((p, seq[i + 1]))
        self.splits[-1].append((len(seq), "causal"))
        self.split_kinds[-1].append("answer" if loss and self.sample_kind[-1] == "det" else "text")
        return start, len(seq), rope + len(seq)

    def vit(self, grid: tuple[int, int], rope: int) -> int:
        h, w = grid
        pdim = self.cfg.vit.patch_dim
        self._tok("text", rope, self.sp.vision_start)
        olds = [self._tok("vit", rope) for _ in range(h * w)]
        self._tok("text", rope, self.sp.vision_end)
        patches = torch.rand(h * w, pdim, generator=self.g) * 2 - 1
        self.vit_imgs.append((patches, grid, olds))
        self.splits[-1].append((h * w + 2, "full"))
        self.split_kinds[-1].append("vit")
        return rope + 1

    def vae(self, grid: tuple[int, int], rope: int, noisy: bool, image: torch.Tensor | None = None) -> int:
        h, w = grid
        d = self.cfg.latent_downsample
        self._tok("text", rope, self.sp.vision_start)
        olds = [self._tok("vae", rope) for _ in range(h * w)]
        self._tok("text", rope, self.sp.vision_end)
        if image is None:
            image = torch.rand(3, h * d, w * d, generator=self.g) * 2 - 1
        logit = float(torch.randn((), generator=self.g)) if noisy else -math.inf
        self.vae_imgs.append((image, grid, logit, olds))
        self.splits[-1].append((h * w + 2, "noise" if noisy else "full"))
        self.split_kinds[-1].append("gen")
        # BAGEL: a noisy image does not advance the RoPE id, a clean one does.
        return rope if noisy else rope + 1

    def build(self, layout_device=None, diga=None):
        from unigendet.data import DigaTeacherBatch, PackedBatch
        from unigendet.ops import AttentionLayout

        cfg = self.cfg
        s = len(self.kinds)
        und = [p for p in range(s) if self.kinds[p] != "vae"]
        gen = [p for p in range(s) if self.kinds[p] == "vae"]
        order = torch.tensor(und + gen, dtype=torch.int64)
        new = torch.empty(s, dtype=torch.int64)
        new[order] = torch.arange(s)

        def idx(olds):
            return new[torch.as_tensor(olds, dtype=torch.int64)] if olds else torch.zeros(0, dtype=torch.int64)

        pos_old = torch.tensor(self.pos_ids, dtype=torch.int64)
        gmax = cfg.vit_max_num_patch_per_side
        vit_pos = [r * gmax + c for _, (h, w), _ in self.vit_imgs for r in range(h) for c in range(w)]
        lmax = cfg.max_latent_size
        vae_pos = [r * lmax + c for _, (h, w), _, _ in self.vae_imgs for r in range(h) for c in range(w)]
        vit_lens = [h * w for _, (h, w), _ in self.vit_imgs]
        cu = torch.zeros(len(vit_lens) + 1, dtype=torch.int32)
        if vit_lens:
            cu[1:] = torch.cumsum(torch.tensor(vit_lens), 0)
        vae_old = [p for *_, olds in self.vae_imgs for p in olds]
        mse_old = [p for _, _, logit, olds in self.vae_imgs if logit != -math.inf for p in olds]
        fields = dict(
            seq_len=s,
            num_und=len(und),
            order=order,
            sample_lens=[sum(n for n, _ in sp) for sp in self.splits],
            splits=[list(sp) for sp in self.splits],
            split_kinds=[list(k) for k in self.split_kinds],
            position_ids=pos_old[order],
            layout=AttentionLayout.from_splits(self.splits, order=order, device=layout_device),
            text_ids=torch.tensor(self.text_ids, dtype=torch.int64),
            text_indexes=idx(self.text_old),
            ce_indexes=idx([p for p, _ in self.ce]),
            ce_labels=torch.tensor([lab for _, lab in self.ce], dtype=torch.int64),
            det_indexes=idx([p for p, _ in self.det]),
            det_labels=torch.tensor([lab for _, lab in self.det], dtype=torch.int64),
            vit_patches=(
                torch.cat([p for p, _, _ in self.vit_imgs]) if self.vit_imgs else torch.zeros(0, cfg.vit.patch_dim)
            ),
            vit_indexes=idx([p for *_, olds in self.vit_imgs for p in olds]),
            vit_position_ids=torch.tensor(vit_pos, dtype=torch.int64),
            vit_cu_seqlens=cu,
            vit_max_seqlen=max(vit_lens, default=0),
            vit_grids=[g for _, g, _ in self.vit_imgs],
            vae_images=[im for im, *_ in self.vae_imgs],
            vae_latent_grids=[g for _, g, _, _ in self.vae_imgs],
            vae_indexes=idx(vae_old),
            vae_position_ids=torch.tensor(vae_pos, dtype=torch.int64),
            vae_image_of_token=torch.tensor(
                [i for i, (_, (h, w), _, _) in enumerate(self.vae_imgs) for _ in range(h * w)], dtype=torch.int64
            ),
            vae_noise_logit=torch.tensor([lg for _, _, lg, _ in self.vae_imgs], dtype=torch.float32),
            mse_indexes=idx(mse_old),
            sample_kind=list(self.sample_kind),
        )
        if diga is None:
            return PackedBatch(**fields, diga=None) if "diga" not in self.sample_kind else DigaTeacherBatch(**fields)
        return PackedBatch(**fields, diga=diga)


def make_batch(
    config: UniGenDetConfig,
    samples: list[DetSpec | GenSpec],
    *,
    seed: int = 0,
    diga: bool = False,
    special: SpecialIds | None = None,
    layout_device=None,
    sample_offset: int = 0,
):
    """A PackedBatch with the given samples, in order (random content from ``seed``).

    With ``diga=True`` every generation sample's image also gets a DIGA teacher sample
    ``[VAE clean] [prompt] [ViT]`` in ``batch.diga`` (same pixels as the student's VAE image).
    ``sample_offset``: index of the first sample in the content stream (see the seeding comment below).
    """
    sp = special or SpecialIds()
    g = torch.Generator().manual_seed(seed)
    pk = _Pack(config, sp, g)
    for k, spec in enumerate(samples):
        # Content of sample k depends only on (seed, sample_offset + k), so a sample packed alone (with the
        # matching offset) gets exactly the same ids and pixels as inside a larger pack.
        g.manual_seed(seed * 1_000_003 + sample_offset + k)
        pk.splits.append([])
        pk.split_kinds.append([])
        rope = 0
        if isinstance(spec, DetSpec):
            pk.sample_kind.append("det")
            rope = pk.vae(spec.vae_grid, rope, noisy=False)
            rope = pk.vit(spec.vit_grid, rope)
            _, _, rope = pk.text(spec.question_len, rope, loss=False)
            if spec.answer_len is not None:
                start, _, rope = pk.text(spec.answer_len, rope, loss=True)
                pk.det.append((start, spec.label))
        elif isinstance(spec, GenSpec):
            pk.sample_kind.append("gen")
            _, _, rope = pk.text(spec.caption_len, rope, loss=False)
            pk.vae(spec.vae_grid, rope, noisy=True)
        else:
            raise ValueError(f"samples must hold DetSpec or GenSpec, got {type(spec).__name__}")
    teacher = None
    if diga:
        tp = _Pack(config, sp, g)
        sids, sgrids, tgrids = [], [], []
        for image_id, spec in enumerate(samples):
            # every sample contributes exactly one VAE image, in sample order
            if not isinstance(spec, GenSpec):
                continue
            img = pk.vae_imgs[image_id][0]
            tp.splits.append([])
            tp.split_kinds.append([])
            tp.sample_kind.append("diga")
            rope = tp.vae(spec.vae_grid, 0, noisy=False, image=img)
            _, _, rope = tp.text(spec.prompt_len, rope, loss=False)
            tp.vit(spec.vit_grid, rope)
            sids.append(image_id)
            sgrids.append(spec.vae_grid)
            tgrids.append(spec.vit_grid)
        teacher = tp.build(layout_device)
        teacher.student_image_ids = torch.tensor(sids, dtype=torch.int64)
        teacher.student_grids = sgrids
        teacher.teacher_grids = tgrids
        teacher.teacher_vit_indexes = teacher.vit_indexes
    return pk.build(layout_device, diga=teacher)
