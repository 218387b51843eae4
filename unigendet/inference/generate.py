"""Text-to-image generation: BAGEL's flow-matching Euler sampler with classifier-free guidance.

Every prompt becomes two samples of one pack, packed exactly as a generation training sample:

* conditional: ``[caption, causal] [VAE latent being sampled, noise mode]``;
* unconditional: ``[VAE latent being sampled, noise mode]`` (the caption dropped, as CFG dropout does in training).

The conditional samples of all prompts come first, then the unconditional ones, so the latent tokens of the pack are
``[x, x]``. The pack (and its attention layout) is built once and reused at every step; each step is ONE forward.
Outside the CFG interval only the conditional samples are needed, and a second, conditional-only pack (also built
once) is used there. The loop is :func:`unigendet.sampling.flow_euler_sample` (the package's one flow sampler),
with one guidance segment per image, so the "global" velocity renormalisation is per image, as in the reference
(which samples one image per call).

For text-to-image the image-guidance context equals the conditional one (there is no context image), so with
``cfg_img_scale > 1`` the image branch reuses the conditional velocity without an extra pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from unigendet.sampling import BRANCH_COND, BRANCH_IMG, BRANCH_UNCOND, RenormType, flow_euler_sample

__all__ = ["ImageGenerator", "tensor_to_pil"]


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` float in [-1, 1] -> RGB PIL image (values outside the range are clipped)."""
    from unigendet.eval.generation import as_uint8

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    return Image.fromarray(as_uint8(image))


def _noise_seed(seed: int, index: int) -> int:
    # One independent stream per prompt index, so an image does not depend on the batch it was generated in.
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(1, np.uint64)[0] >> 1)


class ImageGenerator:
    """Generate images from prompts.

    Args:
        model: a :class:`~unigendet.models.UniGenDet` with ``visual_gen``.
        tokenizer: a :class:`unigendet.tokenizer.Tokenizer`.
        packing: the :class:`~unigendet.data.PackingConfig` (default image size: ``packing.vae.max_size``).
        steps: grid points of the shifted schedule (``steps - 1`` Euler steps, BAGEL's convention).
        shift: schedule shift.
        cfg_text_scale: text guidance scale (``<= 1`` disables guidance and the unconditional branch).
        cfg_img_scale: image guidance scale, ``None`` = off.
        cfg_interval: guidance applies while ``lo < t <= hi``.
        renorm_min, renorm_type: velocity renormalisation after guidance (see ``combine_guidance``).
    """

    def __init__(
        self,
        model,
        tokenizer,
        packing,
        *,
        steps: int = 50,
        shift: float = 3.0,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float | None = None,
        cfg_interval: Sequence[float] = (0.0, 1.0),
        renorm_min: float = 0.0,
        renorm_type: RenormType = "global",
    ):
        if not model.config.visual_gen or model.vae is None:
            raise ValueError("model has no generation path (visual_gen=False or no VAE)")
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if len(cfg_interval) != 2 or not cfg_interval[0] <= cfg_interval[1]:
            raise ValueError(f"cfg_interval must be (lo, hi) with lo <= hi, got {tuple(cfg_interval)}")
        if renorm_type not in ("global", "channel", "text_channel", "none"):
            raise ValueError(f"renorm_type must be global, channel, text_channel or none, got {renorm_type!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.packing = packing
        self.steps = int(steps)
        self.shift = float(shift)
        self.cfg_text_scale = float(cfg_text_scale)
        self.cfg_img_scale = 1.0 if cfg_img_scale is None else float(cfg_img_scale)
        self.cfg_interval = (float(cfg_interval[0]), float(cfg_interval[1]))
        self.renorm_min = float(renorm_min)
        self.renorm_type = renorm_type

    # ------------------------------------------------------------------ geometry
    @property
    def stride(self) -> int:
        return self.model.config.latent_downsample  # VAE downsampling times the latent patch size

    def default_size(self) -> tuple[int, int]:
        """``(height, width)``: a square of ``packing.vae.max_size`` pixels, capped by the latent position table."""
        side = min(self.packing.vae.max_size, self.model.config.max_latent_size * self.stride)
        return side, side

    def latent_grid(self, size: tuple[int, int] | None) -> tuple[int, int]:
        """Latent-patch grid ``(rows, cols)`` of an image of ``size = (height, width)`` pixels."""
        h, w = self.default_size() if size is None else (int(size[0]), int(size[1]))
        s = self.stride
        if h <= 0 or w <= 0 or h % s or w % s:
            raise ValueError(f"size must be (height, width) positive multiples of {s}, got {(h, w)}")
        m = self.model.config.max_latent_size
        if h // s > m or w // s > m:
            raise ValueError(f"size {(h, w)} exceeds the latent position table ({m * s} x {m * s} pixels)")
        return h // s, w // s

    # ------------------------------------------------------------------ packs
    def build_packs(self, prompts: Sequence[str], grid: tuple[int, int]):
        """Host packs ``(cond + uncond, cond only)`` for ``prompts`` at latent grid ``grid``."""
        from unigendet.data.packing import ImageItem, SamplePlan, TextItem, build_packed_batch

        s = self.stride
        size = (grid[1] * s, grid[0] * s)  # (width, height), as SamplePlan stores it
        # Only the shape of the VAE image is read (to check the grid); its pixels are never encoded.
        shape_only = {"vae": torch.zeros(3, grid[0] * s, grid[1] * s)}
        cond = [
            SamplePlan("gen", f"cond{i}", "", size, [TextItem(self.tokenizer.encode(p)), ImageItem("vae", grid, True)])
            for i, p in enumerate(prompts)
        ]
        uncond = [SamplePlan("gen", f"uncond{i}", "", size, [ImageItem("vae", grid, True)]) for i in range(len(cond))]
        packs = []
        for plans in (cond + uncond, cond):
            b = build_packed_batch(plans, [shape_only] * len(plans), self.tokenizer, self.packing)
            b.vae_images = []
            packs.append(b)
        return packs[0], packs[1]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_latents(
        self, prompts: Sequence[str], grid: tuple[int, int], noise: torch.Tensor, *, progress: bool = False
    ) -> torch.Tensor:
        """Integrate from ``noise`` ``(len(prompts) * rows * cols, C)`` (prompt-major) to clean latent tokens."""
        model = self.model
        dev = model.device
        n_img = len(prompts)
        per = grid[0] * grid[1]
        if noise.shape != (n_img * per, model.config.patch_latent_dim):
            raise ValueError(
                f"noise must have shape ({n_img * per}, {model.config.patch_latent_dim}), got {tuple(noise.shape)}"
            )
        full, cond = (b.to(dev) for b in self.build_packs(prompts, grid))

        def velocity(x, t, branches):
            if BRANCH_UNCOND in branches:  # both branches in ONE forward: latent tokens [x, x]
                v_all = model.velocity(full, torch.cat([x, x]), t)
                out = {BRANCH_COND: v_all[: x.shape[0]], BRANCH_UNCOND: v_all[x.shape[0] :]}
            else:
                out = {BRANCH_COND: model.velocity(cond, x, t)}
            if BRANCH_IMG in branches:  # no context image: the image-CFG context is the conditional one
                out[BRANCH_IMG] = out[BRANCH_COND]
            return out

        return flow_euler_sample(
            velocity, noise.to(dev, torch.float32), num_steps=self.steps, shift=self.shift,
            text_scale=self.cfg_text_scale, img_scale=self.cfg_img_scale, cfg_interval=self.cfg_interval,
            renorm_type=self.renorm_type, renorm_min=self.renorm_min, segments=n_img, progress=progress,
        )

    def make_noise(self, n_prompts: int, grid: tuple[int, int], seed: int, start_index: int = 0) -> torch.Tensor:
        """Initial noise ``(n_prompts * rows * cols, C)`` float32 (CPU), one seeded stream per prompt index."""
        per, c = grid[0] * grid[1], self.model.config.patch_latent_dim
        return torch.cat([
            torch.randn(per, c, generator=torch.Generator().manual_seed(_noise_seed(seed, start_index + j)))
            for j in range(n_prompts)
        ])

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        size: tuple[int, int] | None = None,
        seed: int = 0,
        batch_size: int = 4,
        progress: bool = True,
    ) -> list[torch.Tensor]:
        """Generate one image per prompt.

        Args:
            prompts: the captions.
            size: ``(height, width)`` in pixels, multiples of the latent stride (default :meth:`default_size`).
            seed: image ``i`` starts from noise seeded by ``(seed, i)``, whatever the batching.
            batch_size: prompts per packed forward (each contributes a conditional and an unconditional sample).
        Returns:
            list of float32 CPU tensors ``(3, H, W)`` in [-1, 1].
        """
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prompts = list(prompts)
        grid = self.latent_grid(size)
        was_training = self.model.training
        self.model.eval()
        bar = None
        if progress:
            from unigendet._progress import progress_bar

            bar = progress_bar(total=len(prompts), desc="generate", unit="img")
        out: list[torch.Tensor] = []
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                noise = self.make_noise(len(chunk), grid, seed, start)
                x = self.sample_latents(chunk, grid, noise, progress=progress)
                per = grid[0] * grid[1]
                for j in range(len(chunk)):
                    img = self.model.decode_latents(x[j * per : (j + 1) * per], [grid])[0]
                    out.append(img.float().clamp(-1, 1).cpu())
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            self.model.train(was_training)
            if bar is not None:
                bar.close()
        return out
