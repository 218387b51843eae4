"""Packed-batch loaders: a sharded, seeded, resumable ``IterableDataset`` and its ``DataLoader`` wrapper.

Rank ``r`` of ``world_size`` reads every ``world_size``-th record: for each source (detection, generation) and
epoch the records are permuted with a generator seeded by ``(seed, source, epoch)`` (the same on every rank) and
rank ``r`` takes positions ``r, r + world_size, ...``. The rank's samples are interleaved by the configured ratio,
*planned* (tokenised, image header read, CFG dropout and noise seeds drawn from ``(seed, source, epoch, record)``)
and grouped into packs ``k = 0, 1, 2, ...``; only then are images decoded and transformed. Every DataLoader worker
plans the same cheap, deterministic stream and materialises the packs ``k`` with ``k % num_workers == worker``, so
the in-order DataLoader yields packs in the order ``k`` whatever the worker count, and resuming at pack ``k``
re-plans and skips without decoding anything. :class:`PackedLoader` tracks the next ``k``; its ``state_dict()`` is
the data position.

Images are decoded with PIL and resized with torch (``backend="torch"``), or by a DALI pipeline
(``backend="dali"``, see :mod:`unigendet.data.dali`); ``"auto"`` picks DALI when it is installed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .batch import PackedBatch
from .packing import (
    PackingConfig,
    SamplePlan,
    build_diga_batch,
    build_packed_batch,
    iter_packs,
    plan_detection,
    plan_generation,
    weighted_interleave,
)
from .readers import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DetectionRecord,
    GenerationRecord,
    SkipStats,
    image_size,
    load_rgb,
    read_fakeclue,
    read_generation,
)
from .transforms import pil_to_tensor

__all__ = ["EmptyPack", "PackedDataset", "PackedLoader", "load_records", "materialise_torch"]

log = logging.getLogger(__name__)

_SRC_ID = {"det": 1, "gen": 2}


def load_records(
    fakeclue_root: str | None = None,
    generation_source: str | None = None,
    split: str = "train",
    *,
    balance: bool = False,
    strict: bool = False,
    stats: SkipStats | None = None,
) -> tuple[list[DetectionRecord], list[GenerationRecord]]:
    """Detection and generation records; with neither source given, the embedded data set (built on first use).

    ``generation_source`` is a LAION root, manifest, JSONL or caption folder (see :func:`read_generation`); the
    generation half is only read for ``split="train"``.
    """
    if fakeclue_root is None and generation_source is None:
        from .embedded import embedded_dataset

        emb = embedded_dataset()
        fakeclue_root, generation_source = emb.fakeclue_root, emb.laion_root
    det = read_fakeclue(fakeclue_root, split, balance=balance, strict=strict, stats=stats) if fakeclue_root else []
    gen = (read_generation(generation_source, strict=strict, stats=stats)
           if generation_source and split == "train" else [])
    return det, gen


def materialise_torch(plans: list[SamplePlan], cfg: PackingConfig, stats: SkipStats, strict: bool = False):
    """Decode (PIL) and transform every plan's image. Returns (kept plans, per-plan image dicts)."""
    kept, images = [], []
    for p in plans:
        img = load_rgb(p.image, strict=strict, stats=stats)
        if img is None:
            continue
        if img.size != p.size:
            stats.add("size_changed", p.image, f"header {p.size} vs decoded {img.size}", strict)
            continue
        x = pil_to_tensor(img)
        kinds = {it.kind for it in p.items if hasattr(it, "kind")}
        if p.kind == "gen" and cfg.diga:
            kinds.add("vit")
        out = {}
        if "vae" in kinds:
            out["vae"] = cfg.vae(x)
        if "vit" in kinds:
            out["vit"] = cfg.vit(x)
        kept.append(p)
        images.append(out)
    return kept, images


class PackedDataset(torch.utils.data.IterableDataset):
    """Yields :class:`PackedBatch` packs mixing detection and generation samples.

    Args:
        det_records / gen_records: from :func:`read_fakeclue` / :func:`read_generation` (either may be empty).
        tokenizer: a :class:`unigendet.tokenizer.Tokenizer`.
        cfg: a :class:`PackingConfig`.
        seed: fixes every permutation and random draw.
        rank, world_size: this process's data-parallel position.
        shard: how the ranks share the data. ``"records"``: each rank packs its own share of the records (its
            own stream of packs). ``"packs"``: every rank plans the same global stream of packs and takes packs
            ``rank, rank + world_size, ...`` of it, so the sequence of packs, and a training run, does not depend
            on how many processes share it (what :mod:`unigendet.train` uses).
        epochs: number of passes (None: endless; each source restarts on its own when it ends).
        strict: raise on bad data instead of skipping it.
    """

    def __init__(
        self,
        det_records: Sequence[DetectionRecord],
        gen_records: Sequence[GenerationRecord],
        tokenizer,
        cfg: PackingConfig,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        strict: bool = False,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        build_layout: bool = True,
        shard: str = "records",
    ):
        super().__init__()
        if shard not in ("records", "packs"):
            raise ValueError(f"shard must be 'records' or 'packs', got {shard!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be None or >= 1, got {epochs}")
        self.det_records = list(det_records)
        self.gen_records = list(gen_records)
        if not self.det_records and not self.gen_records:
            raise ValueError("det_records and gen_records are both empty")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epochs = epochs
        self.strict = strict
        self.max_image_pixels = max_image_pixels
        self.build_layout = build_layout
        self.shard = shard
        # first pack index of the planned stream to produce (with shard="packs": a multiple of world_size)
        self.start_pack = 0
        self._sizes: dict[str, tuple[int, int]] = {}  # image path -> (width, height) from its header

    # -------------------------------------------------------------- planning (cheap, deterministic)
    def _source(self, name: str, shard: int, n_shards: int, stats: SkipStats) -> Iterator[SamplePlan]:
        records = self.det_records if name == "det" else self.gen_records
        if not records:
            return
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            perm = np.random.default_rng([self.seed, _SRC_ID[name], epoch]).permutation(len(records))
            produced = False
            for idx in perm[shard::n_shards].tolist():
                rec = records[idx]
                size = self._sizes.get(rec.image)
                if size is None:
                    size = image_size(rec.image, max_pixels=self.max_image_pixels, strict=self.strict, stats=stats)
                    if size is None:
                        continue
                    # Later epochs and resumption re-plan from the start: read each header only once.
                    self._sizes[rec.image] = size
                produced = True
                if name == "det":
                    yield plan_detection(rec, self.tokenizer, self.cfg, size)
                else:
                    rng = np.random.default_rng([self.seed, _SRC_ID[name], epoch, idx])
                    yield plan_generation(rec, self.tokenizer, self.cfg, size, rng)
            if not produced and self.epochs is None:
                return  # nothing usable in this shard: do not spin forever
            epoch += 1

    def plan_packs(self, shard: int, n_shards: int, stats: SkipStats) -> Iterator[list[SamplePlan]]:
        """The shard's stream of pack plans (lists of samples), before any image is decoded."""
        streams = {k: self._source(k, shard, n_shards, stats) for k in ("gen", "det")}
        weights = {"gen": self.cfg.gen_weight, "det": self.cfg.det_weight}
        skipped: dict = {}
        mixed = (plan for _, plan in weighted_interleave(streams, weights))
        for pack in iter_packs(mixed, self.cfg, skipped):
            for k, v in skipped.items():
                stats.counts[k] += v
            skipped.clear()
            yield pack

    # -------------------------------------------------------------- materialising
    def build(self, plans: list[SamplePlan], images: list[dict], pack_id, stats: SkipStats) -> PackedBatch | None:
        """Build the PackedBatch (and the DIGA teacher batch when configured) from decoded images."""
        if not plans:
            return None
        batch = build_packed_batch(plans, images, self.tokenizer, self.cfg, build_layout=self.build_layout)
        if self.cfg.diga:
            batch.diga = build_diga_batch(plans, images, batch, self.tokenizer, self.cfg,
                                          build_layout=self.build_layout)
        batch.pack_id = pack_id
        batch.skipped = dict(stats.counts)
        return batch

    @property
    def pack_stride(self) -> int:
        """Distance between two consecutive packs of this rank in the planned stream."""
        return self.world_size if self.shard == "packs" else 1

    def iter_packs(self, worker: int = 0, num_workers: int = 1, materialise=None) -> Iterator:
        """Loader worker ``worker`` of ``num_workers``'s share of this rank's packs ``k >= start_pack``, in order.

        This rank's packs are its whole stream (``shard="records"``) or every ``world_size``-th pack of the global
        one from ``rank`` on (``shard="packs"``); the workers take them round-robin. Yields :class:`PackedBatch`
        (or :class:`EmptyPack` when every sample of a pack failed to decode, so that the consumer still sees the
        position advance).
        """
        materialise = materialise or (lambda plans, stats: materialise_torch(plans, self.cfg, stats, self.strict))
        if self.shard == "packs":
            planned = (0, 1)
            worker, num_workers = self.rank + self.world_size * worker, self.world_size * num_workers
        else:
            planned = (self.rank, self.world_size)
        stats = SkipStats()
        for k, plans in enumerate(self.plan_packs(*planned, stats)):
            mine = k >= self.start_pack and (k - self.start_pack) % num_workers == worker
            if mine:
                plans, images = materialise(plans, stats)
                batch = self.build(plans, images, (self.rank, k), stats)
                yield batch if batch is not None else EmptyPack((self.rank, k), dict(stats.counts))
            stats = SkipStats()  # skips are reported once, by the worker that owns the pack

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_packs(wid, nw)


@dataclass
class EmptyPack:
    """A pack position whose samples were all skipped (bad images)."""

    pack_id: tuple[int, int]
    skipped: dict


def _identity(x):
    return x


def _worker_init(_worker_id: int) -> None:
    # Workers already run in parallel; intra-op threads per worker would oversubscribe the cores.
    torch.set_num_threads(1)


class PackedLoader:
    """Iterates a :class:`PackedDataset` with a ``DataLoader`` (torch backend) or a DALI pipeline, and tracks the
    data position for exact resumption (``state_dict`` / ``load_state_dict``).

    Args:
        backend: ``"torch"`` (PIL decode + torch resize in ``num_workers`` worker processes), ``"dali"`` (DALI
            decode + resize; ``num_threads`` DALI threads, packing in this process) or ``"auto"``.
        device_id: GPU for DALI's ``mixed`` decoder; None decodes on the CPU.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        *,
        num_workers: int = 0,
        backend: str = "torch",
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        num_threads: int = 2,
        device_id: int | None = None,
        timeout: float = 0,
    ):
        if backend not in ("torch", "dali", "auto"):
            raise ValueError(f"backend must be 'torch', 'dali' or 'auto', got {backend!r}")
        if backend == "auto":
            from . import dali

            backend = "dali" if dali.dali_available() else "torch"
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.backend = backend
        self.num_workers = num_workers if backend == "torch" else 0
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.num_threads = num_threads
        self.device_id = device_id
        self.timeout = timeout
        self.stats = SkipStats()
        self.empty_packs = 0  # packs whose every sample failed to decode (skipped, their position counted)
        self._next = dataset.rank if dataset.shard == "packs" else 0

    def state_dict(self) -> dict:
        """The data position (the index of this rank's next pack in the planned stream) plus what must match on
        resume."""
        return {"next_pack": self._next, "seed": self.dataset.seed, "rank": self.dataset.rank,
                "world_size": self.dataset.world_size, "shard": self.dataset.shard}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (the worker count and backend may differ; seed, rank, world size and sharding
        may not)."""
        ds = self.dataset
        mine = {"seed": ds.seed, "rank": ds.rank, "world_size": ds.world_size, "shard": ds.shard}
        theirs = {k: state.get(k, "records" if k == "shard" else None) for k in mine}
        if theirs != mine:
            raise ValueError(f"state was saved with {theirs}, this loader has {mine}")
        self._next = int(state["next_pack"])

    def _batches(self) -> Iterator[PackedBatch]:
        # shard="packs": this rank's next pack is rank + a multiple of world_size; the stream restarts there
        self.dataset.start_pack = self._next - (self.dataset.rank if self.dataset.shard == "packs" else 0)
        if self.backend == "dali":
            from .dali import DaliMaterialiser

            mat = DaliMaterialiser(self.dataset.cfg, num_threads=self.num_threads, device_id=self.device_id,
                                   seed=self.dataset.seed)
            strict = self.dataset.strict
            yield from self.dataset.iter_packs(0, 1, lambda plans, stats: mat(plans, stats, strict))
            return
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            worker_init_fn=_worker_init,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False,
            timeout=self.timeout if self.num_workers > 0 else 0,
        )
        yield from loader

    def __iter__(self) -> Iterator[PackedBatch]:
        log.info("data backend: %s (%d worker(s), rank %d of %d)", self.backend, self.num_workers,
                 self.dataset.rank, self.dataset.world_size)
        for batch in self._batches():
            self._next = batch.pack_id[1] + self.dataset.pack_stride
            for reason, n in batch.skipped.items():
                self.stats.counts[reason] += n
            if isinstance(batch, EmptyPack):
                self.empty_packs += 1
                continue
            yield batch
