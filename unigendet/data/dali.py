"""DALI image pipelines: decode, resize to both NaViT sizes and normalise, fed from the readers.

The pipeline takes encoded files through ``fn.external_source`` together with each sample's two target sizes
(computed on the host by the same rule as the torch path), decodes (``mixed``, i.e. nvJPEG on the GPU, when a
``device_id`` is given, ``cpu`` otherwise), resizes with an antialiased cubic filter and normalises to [-1, 1] in
CHW layout. ``nvidia-dali`` is optional: this module imports it only when a pipeline is built.

Differences from the PIL/torch path: DALI's cubic kernel is not torch's (a=-0.75) bicubic, so values differ
slightly near edges; images with alpha lose the alpha channel instead of being composited on white.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

__all__ = ["DaliImagePipeline", "DaliMaterialiser", "dali_available", "dali_unavailable_reason"]

log = logging.getLogger(__name__)


@functools.cache
def dali_unavailable_reason() -> str | None:
    """None when ``nvidia.dali`` imports, else why not."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return f"nvidia-dali is not usable: {type(e).__name__}: {e}"
    return None


def dali_available() -> bool:
    return dali_unavailable_reason() is None


class DaliImagePipeline:
    """Decode + resize + normalise a batch of encoded images to two target sizes each.

    Args:
        max_batch_size: the most images per call (larger inputs are processed in chunks).
        num_threads: DALI CPU threads.
        device_id: GPU id for the ``mixed`` decoder and GPU resize; None runs everything on the CPU.
        seed: DALI's seed (the pipeline draws nothing random; fixed for reproducibility).
    """

    def __init__(self, max_batch_size: int = 64, num_threads: int = 2, device_id: int | None = None, seed: int = 0):
        reason = dali_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        from nvidia.dali import fn, pipeline_def, types

        decode_device = "cpu" if device_id is None else "mixed"

        @pipeline_def
        def _pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            sizes = [fn.external_source(name=n, dtype=types.FLOAT, ndim=0) for n in ("aw", "ah", "bw", "bh")]
            img = fn.decoders.image(enc, device=decode_device, output_type=types.RGB)
            outs = []
            for w, h in ((sizes[0], sizes[1]), (sizes[2], sizes[3])):
                r = fn.resize(img, resize_x=w, resize_y=h, interp_type=types.INTERP_CUBIC, antialias=True)
                outs.append(
                    fn.crop_mirror_normalize(
                        r, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3, std=[127.5] * 3
                    )
                )
            return tuple(outs)

        self.max_batch_size = max_batch_size
        self.device_id = device_id
        self.decode_device = decode_device
        self._make = lambda: _pipe(
            batch_size=max_batch_size,
            num_threads=num_threads,
            device_id=device_id,
            seed=seed,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        self._pipe = self._make()
        self._pipe.build()
        log.info("DALI image pipeline: decode on %s, %d thread(s)", decode_device, num_threads)

    @staticmethod
    def _to_torch(tl) -> list[torch.Tensor]:
        if hasattr(tl, "as_cpu"):
            tl = tl.as_cpu()
        return [torch.from_numpy(np.array(tl[i])) for i in range(len(tl))]

    def _run_chunk(self, encoded, size_a, size_b):
        p = self._pipe
        p.feed_input("encoded", [np.asarray(e, dtype=np.uint8) for e in encoded])
        for name, vals in (("aw", [s[0] for s in size_a]), ("ah", [s[1] for s in size_a]),
                           ("bw", [s[0] for s in size_b]), ("bh", [s[1] for s in size_b])):
            p.feed_input(name, [np.float32(v) for v in vals])
        try:
            a, b = p.run()
        except Exception:
            # A failed run can leave fed inputs queued: start from a fresh pipeline.
            self._pipe = self._make()
            self._pipe.build()
            raise
        return self._to_torch(a), self._to_torch(b)

    def __call__(self, encoded: list, size_a: list[tuple[int, int]], size_b: list[tuple[int, int]]):
        """encoded: list of uint8 arrays (file bytes); size_a/size_b: per image (width, height).

        Returns two lists of float32 (3, h, w) tensors in [-1, 1].
        """
        if not (len(encoded) == len(size_a) == len(size_b)):
            raise ValueError("encoded, size_a and size_b must have the same length")
        out_a, out_b = [], []
        for i in range(0, len(encoded), self.max_batch_size):
            j = i + self.max_batch_size
            a, b = self._run_chunk(encoded[i:j], size_a[i:j], size_b[i:j])
            out_a += a
            out_b += b
        return out_a, out_b


class DaliMaterialiser:
    """Drop-in for :func:`unigendet.data.loader.materialise_torch` that decodes and resizes with DALI.

    A batch that fails to decode is retried image by image; images that still fail are skipped (counted as
    ``corrupt_image``).
    """

    def __init__(self, cfg, *, num_threads: int = 2, device_id: int | None = None, seed: int = 0,
                 max_batch_size: int = 64):
        self.cfg = cfg
        self.pipe = DaliImagePipeline(max_batch_size, num_threads, device_id, seed)

    def _sizes(self, p):
        kinds = {it.kind for it in p.items if hasattr(it, "kind")}
        if p.kind == "gen" and self.cfg.diga:
            kinds.add("vit")
        w, h = p.size
        # An unused output is resized to a single patch to cost next to nothing.
        vit = self.cfg.vit.size_for(w, h) if "vit" in kinds else (self.cfg.vit.stride,) * 2
        vae = self.cfg.vae.size_for(w, h) if "vae" in kinds else (self.cfg.vae.stride,) * 2
        return kinds, vit, vae

    def __call__(self, plans, stats, strict: bool = False):
        enc, kept, meta = [], [], []
        for p in plans:
            try:
                data = np.fromfile(p.image, dtype=np.uint8)
            except OSError as e:
                stats.add("missing_file", p.image, str(e), strict)
                continue
            enc.append(data)
            kept.append(p)
            meta.append(self._sizes(p))
        if not kept:
            return [], []
        vits = [m[1] for m in meta]
        vaes = [m[2] for m in meta]
        try:
            a, b = self.pipe(enc, vits, vaes)
            ok = list(range(len(kept)))
        except RuntimeError:
            a, b, ok = [], [], []
            for i in range(len(kept)):
                try:
                    ai, bi = self.pipe([enc[i]], [vits[i]], [vaes[i]])
                except RuntimeError as e:
                    stats.add("corrupt_image", kept[i].image, f"DALI: {str(e).splitlines()[0][:200]}", strict)
                    continue
                a += ai
                b += bi
                ok.append(i)
        images = []
        for j, i in enumerate(ok):
            kinds = meta[i][0]
            out = {}
            if "vit" in kinds:
                out["vit"] = a[j]
            if "vae" in kinds:
                out["vae"] = b[j]
            images.append(out)
        return [kept[i] for i in ok], images
