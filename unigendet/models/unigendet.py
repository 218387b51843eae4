"""The UniGenDet model: BAGEL-7B-MoT plus the real/fake head and the DIGA projector.

``UniGenDet.forward(batch)`` consumes a :class:`unigendet.data.PackedBatch` (expert-contiguous token order) and
returns the inputs of every loss: detection logits at the answer's ``<|im_start|>``, next-token logits at the CE
positions, the flow-matching prediction and target at the noisy latent tokens, and, for a batch carrying a DIGA
teacher pack, the projected student states and the teacher features. :func:`gduf_losses` and
:func:`diga_losses` turn that dict into the two training stages' objectives.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import UniGenDetConfig
from .connectors import (
    MLPconnector,
    PositionEmbedding,
    TimestepEmbedder,
    diga_mlp,
    fake_cls_head,
    latent_patchify,
    latent_unpatchify,
    shift_timesteps,
)
from .qwen2_mot import Qwen2MoTForCausalLM, RMSNorm
from .siglip import SiglipVisionModel
from .smsa import smsa_layout
from .vae import build_vae

__all__ = ["UniGenDet", "gduf_losses", "diga_losses", "flow_mse"]


def _packed_attn(layout):
    from unigendet.ops import packed_attention

    def attn(q, k, v):
        return packed_attention(q, k, v, layout)

    return attn


class UniGenDet(nn.Module):
    """BAGEL MoT backbone with SigLIP understanding, FLUX-latent generation and the UniGenDet heads.

    Submodules (and so checkpoint keys) follow BAGEL: ``language_model``, ``vit_model``, ``connector``,
    ``vit_pos_embed``, ``latent_pos_embed``, ``time_embedder``, ``vae2llm``, ``llm2vae``, ``fake_cls_head``,
    ``diga_mlp``. The frozen autoencoder is the submodule ``vae`` and is *not* part of the checkpoint key space
    (see :mod:`unigendet.models.checkpoint`).
    """

    def __init__(self, config: UniGenDetConfig, *, build_vae_module: bool = True):
        super().__init__()
        self.config = config
        h = config.llm.hidden_size
        self.hidden_size = h
        self.language_model = Qwen2MoTForCausalLM(config.llm)
        if config.visual_und:
            self.vit_model = SiglipVisionModel(config.vit)
            self.connector = MLPconnector(config.vit.hidden_size, h, config.connector_act)
            self.vit_pos_embed = PositionEmbedding(config.vit_max_num_patch_per_side, h)
        if config.visual_gen:
            self.time_embedder = TimestepEmbedder(h, scale=config.timestep_embed_scale)
            self.vae2llm = nn.Linear(config.patch_latent_dim, h)
            self.llm2vae = nn.Linear(h, config.patch_latent_dim)
            self.latent_pos_embed = PositionEmbedding(config.max_latent_size, h)
        self.fake_cls_head = fake_cls_head(h, config.cls_head_act)
        self.diga_mlp = diga_mlp(h, config.diga_mlp_ratio)
        self.vae = build_vae(config.vae) if (build_vae_module and config.visual_gen) else None
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Fresh-model initialisation (HF-style normal(0, std) linears/embeddings; ``llm2vae`` zero, as BAGEL, or
        the tied orthogonal pair of ``config.latent_connector_init="tied"``)."""
        for name, m in self.named_modules():
            if name == "vae" or name.startswith("vae."):
                continue
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                m.reset_parameters()
        if self.config.visual_gen:
            nn.init.zeros_(self.llm2vae.weight)
            nn.init.zeros_(self.llm2vae.bias)
            if self.config.latent_connector_init == "tied":  # see UniGenDetConfig.latent_connector_init
                w = torch.empty_like(self.vae2llm.weight)
                nn.init.orthogonal_(w)
                self.vae2llm.weight.copy_(w)
                self.llm2vae.weight.copy_(w.T)
        self.reset_fixed_buffers()

    @torch.no_grad()
    def reset_fixed_buffers(self) -> None:
        """Recompute the fixed sin-cos position tables (after ``to_empty`` or when loading a checkpoint)."""
        for m in self.modules():
            if isinstance(m, PositionEmbedding):
                m.reset_parameters()

    def configure_stage(self, stage: str) -> list[str]:
        """Set ``requires_grad`` for a training stage; returns the names of the trainable parameters.

        ``gduf``: everything except the VAE. ``diga``: only the generation
        expert (names containing ``moe_gen``), ``time_embedder``, ``vae2llm``, ``llm2vae`` and ``diga_mlp`` train;
        the ViT, ``connector``, ``fake_cls_head`` and every other ``language_model`` parameter (embeddings,
        ``lm_head``, understanding expert, ``norm``) are frozen. (The reference script leaves ``connector`` and
        ``fake_cls_head`` trainable although no gradient reaches them; freezing them keeps them bit-identical
        under weight decay.)
        """
        if stage not in ("gduf", "diga"):
            raise ValueError(f"stage must be 'gduf' or 'diga', got {stage!r}")
        names = []
        for n, p in self.named_parameters():
            if n.startswith("vae."):
                train = False
            elif stage == "gduf":
                train = True
            else:
                train = self.is_generation_parameter(n)
            p.requires_grad_(train)
            if train:
                names.append(n)
        return names

    @staticmethod
    def is_generation_parameter(name: str) -> bool:
        """The generation side of the model: the generation expert (``moe_gen``), ``time_embedder``, ``vae2llm``,
        ``llm2vae`` and ``diga_mlp`` (what DIGA trains; ``optim.gen_lr_scale`` scales its learning rate)."""
        return "moe_gen" in name or name.startswith(("time_embedder.", "vae2llm.", "llm2vae.", "diga_mlp."))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.language_model.model.gradient_checkpointing = enabled
        if self.config.visual_und:
            self.vit_model.gradient_checkpointing = enabled

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_latents(
        self,
        images: Sequence[torch.Tensor],
        grids: Sequence[tuple[int, int]],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """VAE-encode images (3, H, W) in [-1, 1] and patchify -> (sum h*w, p*p*z) fp32 clean latent tokens.

        Images of equal size are encoded as one batch; the tokens come out in image order, row-major.
        """
        if self.vae is None:
            raise ValueError("this model has no VAE (build_vae_module=False or visual_gen=False)")
        cfg = self.config
        p, d = cfg.latent_patch_size, cfg.latent_downsample
        if len(images) != len(grids):
            raise ValueError(f"images ({len(images)}) and grids ({len(grids)}) must have the same length")
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (img, (h, w)) in enumerate(zip(images, grids)):
            if img.dim() != 3 or img.shape[0] != 3 or img.shape[1] != h * d or img.shape[2] != w * d:
                raise ValueError(f"vae_images[{i}] must have shape (3, {h * d}, {w * d}), got {tuple(img.shape)}")
            by_shape.setdefault(tuple(img.shape), []).append(i)
        tokens: list[torch.Tensor | None] = [None] * len(images)
        for idx in by_shape.values():
            z = self.vae.encode(torch.stack([images[i] for i in idx]).to(self.device), generator).float()
            for j, i in enumerate(idx):
                tokens[i] = latent_patchify(z[j], p)
        if not tokens:
            return torch.zeros(0, cfg.patch_latent_dim, device=self.device)
        return torch.cat(tokens)

    @torch.no_grad()
    def decode_latents(self, tokens: torch.Tensor, grids: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Inverse of :meth:`encode_latents` (up to the VAE): tokens -> list of images (3, H, W)."""
        cfg = self.config
        out, off = [], 0
        for h, w in grids:
            lat = latent_unpatchify(tokens[off : off + h * w], h, w, cfg.latent_patch_size, cfg.latent_channels)
            # fp32 out whatever dtype the frozen VAE is stored in (it casts its input itself)
            out.append(self.vae.decode(lat[None].to(self.device))[0].float())
            off += h * w
        return out

    def embed_vit(self, batch) -> torch.Tensor:
        """SigLIP -> connector -> + fixed 2-D position table, for the batch's ViT tokens (n_vit, hidden)."""
        feats = self.vit_model(
            batch.vit_patches, batch.vit_position_ids, batch.vit_cu_seqlens, batch.vit_max_seqlen
        )
        return self.connector(feats) + self.vit_pos_embed(batch.vit_position_ids).to(feats.dtype)

    def embed_latents(self, x_t: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """vae2llm(x_t) + time_embedder(t) + latent 2-D position table -> (n_lat, hidden)."""
        dt = self.dtype
        return self.vae2llm(x_t.to(dt)) + self.time_embedder(t) + self.latent_pos_embed(position_ids).to(dt)

    # ------------------------------------------------------------------ core pass
    def embed(
        self,
        batch,
        *,
        latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        x_t: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Input embeddings of a pack, split by expert.

        Args:
            batch: a PackedBatch (expert-contiguous order).
            latents: (n_lat, p*p*z) clean latent tokens to use instead of VAE-encoding ``batch.vae_images``.
            noise: (n_lat, p*p*z) flow noise to use instead of drawing it from ``generator``.
            generator: RNG for the VAE posterior sample and the flow noise.
            x_t, t: (n_lat, p*p*z) noisy latent tokens and their (shifted) timesteps (n_lat,), given directly
                (sampling); the VAE and the batch's noise logits are then not used.
        Returns:
            dict with ``h_und`` (n_und, hidden), ``h_gen`` (n_gen, hidden) and, when the pack has latent tokens,
            ``x0``, ``noise`` (fp32, per latent token) and ``t`` (fp32 shifted timestep per latent token).
        """
        cfg = self.config
        dev, dt = self.device, self.dtype
        nu, s = int(batch.num_und), int(batch.seq_len)
        h = self.hidden_size
        if batch.position_ids.shape != (s,):
            raise ValueError(f"batch.position_ids must have shape ({s},), got {tuple(batch.position_ids.shape)}")

        h_und = torch.zeros(nu, h, device=dev, dtype=dt)
        if batch.text_ids.numel():
            h_und = h_und.index_put((batch.text_indexes,), self.language_model.model.embed_tokens(batch.text_ids))
        if batch.vit_patches.shape[0]:
            if not cfg.visual_und:
                raise ValueError("batch has ViT tokens but the model was built with visual_und=False")
            h_und = h_und.index_put((batch.vit_indexes,), self.embed_vit(batch))

        out: dict[str, Any] = {"h_und": h_und}
        h_gen = torch.zeros(s - nu, h, device=dev, dtype=dt)
        n_lat = batch.vae_indexes.shape[0]
        if n_lat and x_t is not None:
            if x_t.shape != (n_lat, cfg.patch_latent_dim) or t is None or t.shape != (n_lat,):
                raise ValueError(
                    f"x_t must be ({n_lat}, {cfg.patch_latent_dim}) and t ({n_lat},), got "
                    f"{tuple(x_t.shape)} and {None if t is None else tuple(t.shape)}"
                )
            emb = self.embed_latents(x_t.float(), t.float(), batch.vae_position_ids)
            h_gen = h_gen.index_put((batch.vae_indexes - nu,), emb)
        elif n_lat:
            if not cfg.visual_gen:
                raise ValueError("batch has VAE tokens but the model was built with visual_gen=False")
            x0 = latents
            if x0 is None:
                x0 = self.encode_latents(batch.vae_images, batch.vae_latent_grids, generator)
            if x0.shape != (n_lat, cfg.patch_latent_dim):
                raise ValueError(f"latents must have shape ({n_lat}, {cfg.patch_latent_dim}), got {tuple(x0.shape)}")
            x0 = x0.float()
            if noise is None:
                noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
            elif noise.shape != x0.shape:
                raise ValueError(f"noise must have shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
            noise = noise.float()
            # sigmoid(-inf) = 0 exactly: clean conditioning images keep x_t = x0 and t = 0.
            t = torch.sigmoid(batch.vae_noise_logit.float()[batch.vae_image_of_token])
            t = shift_timesteps(t, cfg.timestep_shift)
            x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
            h_gen = h_gen.index_put((batch.vae_indexes - nu,), self.embed_latents(x_t, t, batch.vae_position_ids))
            out.update(x0=x0, noise=noise, t=t)
        out["h_gen"] = h_gen
        return out

    def run(
        self,
        batch,
        *,
        latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        layout=None,
        num_layers: int | None = None,
        capture_layer: int | None = None,
        x_t: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Embed a pack (:meth:`embed`) and run the decoder.

        Args:
            layout: attention layout to use instead of ``batch.layout`` (e.g. an SMSA variant).
            num_layers: run only the first layers (normalised by the final expert norms afterwards).
            capture_layer: also keep the raw residual stream after this many layers.
            (others as in :meth:`embed`)
        Returns:
            :meth:`embed`'s dict plus ``und`` (n_und, hidden) / ``gen`` (n_gen, hidden) final-normed states and,
            with ``capture_layer``, ``captured_und`` / ``captured_gen``.
        """
        out = self.embed(batch, latents=latents, noise=noise, generator=generator, x_t=x_t, t=t)
        attn_fn = _packed_attn(batch.layout if layout is None else layout)
        out.update(
            self.language_model.model(
                out["h_und"],
                out["h_gen"],
                batch.position_ids,
                attn_fn,
                num_layers=num_layers,
                capture_layer=capture_layer,
            )
        )
        return out

    def forward(
        self,
        batch,
        *,
        generator: torch.Generator | None = None,
        layout=None,
        diga_teacher: UniGenDet | None = None,
        latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Training forward.

        Args:
            batch: PackedBatch. With ``batch.diga`` set, also computes the DIGA student/teacher pair.
            generator: RNG for VAE sampling and flow noise.
            layout: attention layout overriding ``batch.layout``; default: ``batch.layout`` when the pack was
                built under ``config.smsa_mode`` (``batch.smsa``), else ``smsa_layout(batch, config.smsa_mode)``.
            diga_teacher: frozen teacher (:meth:`make_diga_teacher`); default: this model under ``no_grad``
                (what the reference code does).
            latents: precomputed clean latent tokens for ``batch.vae_images``.
            noise: flow noise per latent token (default: drawn from ``generator``).
        Returns:
            dict: ``det_logits`` (n_det, 2), ``det_labels``; ``ce_logits`` (n_ce, vocab), ``ce_labels``,
            ``ce_hidden`` (n_ce, hidden); ``flow_pred`` / ``flow_target`` (n_mse, p*p*z); ``hidden_und`` /
            ``hidden_gen`` final-normed states; with DIGA: ``diga_student`` (n, hidden), ``diga_teacher``
            (m, hidden), ``diga_student_grids``, ``diga_teacher_grids``.
        """
        cfg = self.config
        if layout is None and cfg.smsa_mode != batch.smsa:
            # Host work on the pack's splits; a pack built with PackingConfig(smsa=config.smsa_mode) (the trainer's
            # loader) carries this layout already.
            layout = smsa_layout(batch, cfg.smsa_mode)
        tb = getattr(batch, "diga", None)
        capture = cfg.diga_layer if tb is not None else None
        st = self.run(
            batch, latents=latents, noise=noise, generator=generator, layout=layout, capture_layer=capture
        )
        nu = int(batch.num_und)
        und, gen = st["und"], st["gen"]
        out: dict[str, Any] = {"hidden_und": und, "hidden_gen": gen}

        out["det_logits"] = self.fake_cls_head(und[batch.det_indexes])
        out["det_labels"] = batch.det_labels
        out["ce_hidden"] = und[batch.ce_indexes]  # for a fused linear + cross-entropy
        out["ce_logits"] = self.language_model.lm_head(out["ce_hidden"])
        out["ce_labels"] = batch.ce_labels

        if "x0" in st:
            # Flow targets in gen-block order: latent token i sits at gen position vae_indexes[i] - num_und.
            gen_pos = batch.vae_indexes - nu
            target = torch.zeros(gen.shape[0], cfg.patch_latent_dim, device=gen.device, dtype=torch.float32)
            target = target.index_put((gen_pos,), st["noise"] - st["x0"])
            mse_pos = batch.mse_indexes - nu
            out["flow_pred"] = self.llm2vae(gen[mse_pos])
            out["flow_target"] = target[mse_pos]
        else:
            out["flow_pred"] = gen.new_zeros(0, cfg.patch_latent_dim)
            out["flow_target"] = torch.zeros(0, cfg.patch_latent_dim, device=gen.device)

        if tb is not None:
            idx = self._student_token_index(batch, tb)
            gen_pos = batch.vae_indexes - nu
            out["diga_student"] = self.diga_mlp(st["captured_gen"][gen_pos[idx]])
            teacher = self if diga_teacher is None else diga_teacher
            with torch.no_grad():
                ts = teacher.run(tb, latents=st["x0"][idx], generator=generator, num_layers=cfg.diga_layer)
            out["diga_teacher"] = ts["und"][tb.teacher_vit_indexes]
            out["diga_student_grids"] = list(tb.student_grids)
            out["diga_teacher_grids"] = list(tb.teacher_grids)
        return out

    @torch.no_grad()
    def velocity(self, batch, x_t: torch.Tensor, t: torch.Tensor, *, layout=None) -> torch.Tensor:
        """Predicted flow velocity (``eps - x0`` direction) at every latent token of ``batch``.

        Args:
            batch: a pack whose latent tokens are the image being generated (e.g. ``[caption] [VAE noise]``).
            x_t: (n_lat, p*p*z) current latent tokens, in ``batch.vae_indexes`` order.
            t: (n_lat,) or 0-d shifted time in (0, 1] (1 = pure noise).
        Returns:
            (n_lat, p*p*z) fp32 velocity.
        """
        n_lat = batch.vae_indexes.shape[0]
        t = t.float().expand(n_lat) if t.dim() == 0 else t
        st = self.run(batch, x_t=x_t, t=t, layout=layout)
        return self.llm2vae(st["gen"][batch.vae_indexes - int(batch.num_und)]).float()

    def velocity_fn(self, branches):
        """A :data:`unigendet.sampling.VelocityFn` over one pack per guidance branch.

        ``branches`` maps a branch name (``"cond"``, ``"uncond"``, ``"img"``) to a pack whose latent tokens are the
        image being sampled; every pack must hold the same number of latent tokens.
        """

        def fn(x, t, names):
            return {n: self.velocity(branches[n], x, t) for n in names}

        return fn

    @staticmethod
    def _student_token_index(batch, tb) -> torch.Tensor:
        """Latent-token indices (into the student's latent tokens) of each teacher image's student image.

        Built from host lists plus one device gather, so no host synchronisation happens.
        """
        grids = list(batch.vae_latent_grids)
        sizes = [h * w for h, w in grids]
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        counts = [h * w for h, w in tb.student_grids]
        dev = batch.vae_indexes.device
        sid = torch.as_tensor(tb.student_image_ids, dtype=torch.int64).to(dev, non_blocking=True)
        if sid.shape[0] != len(counts):
            raise ValueError(
                f"diga.student_image_ids ({sid.shape[0]}) and diga.student_grids ({len(counts)}) disagree"
            )
        base = torch.as_tensor(offsets, dtype=torch.int64).to(dev, non_blocking=True)[sid]
        total = sum(counts)
        base = torch.repeat_interleave(
            base, torch.as_tensor(counts, dtype=torch.int64).to(dev, non_blocking=True), output_size=total
        )
        local = torch.cat([torch.arange(n, dtype=torch.int64) for n in counts] or [torch.zeros(0, dtype=torch.int64)])
        return base + local.to(dev, non_blocking=True)

    # ------------------------------------------------------------------ DIGA teacher
    def make_diga_teacher(self) -> UniGenDet:
        """A frozen copy of the parts the DIGA teacher pass uses (first ``diga_layer`` layers, ViT, connectors).

        The later decoder layers, ``lm_head`` and the two heads are left out of the copy (the teacher never runs
        them) and the frozen VAE is shared, so the copy costs only the first ``diga_layer`` layers plus the
        embeddings and encoders. This model's own parameters are untouched.
        """
        lm = self.language_model
        n = self.config.diga_layer
        # deepcopy's memo maps an object to what its copy should be: None drops it, itself shares it.
        memo: dict[int, Any] = {id(m): None for m in (lm.lm_head, self.fake_cls_head, self.diga_mlp)}
        memo.update({id(layer): None for layer in lm.model.layers[n:]})
        if self.vae is not None:
            memo[id(self.vae)] = self.vae
        teacher = copy.deepcopy(self, memo)
        teacher.language_model.model.layers = nn.ModuleList(list(teacher.language_model.model.layers[:n]))
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        return teacher


# ------------------------------------------------------------------ losses


def flow_mse(out: dict[str, Any], denominator: float | None = None) -> torch.Tensor:
    """Flow-matching loss: squared error averaged over channels, summed over tokens, / denominator (n_mse)."""
    pred, target = out["flow_pred"], out["flow_target"]
    n = pred.shape[0]
    per_tok = (pred.float() - target.float()).pow(2).mean(-1)
    return per_tok.sum() / (denominator if denominator is not None else max(n, 1))


def gduf_losses(
    out: dict[str, Any],
    *,
    ce_weight: float = 1.0,
    mse_weight: float = 1.0,
    label_weight: float = 0.2,
    ce_denominator: float | None = None,
    mse_denominator: float | None = None,
) -> dict[str, torch.Tensor]:
    """Stage-1 (GDUF) objective: ``ce_weight*CE_text + mse_weight*MSE_flow + label_weight*CE_label``.

    ``ce_denominator`` / ``mse_denominator`` default to the local token counts; pass global (all-reduced)
    counts times world size to reproduce the reference's cross-rank normalisation.
    """
    logits, labels = out["ce_logits"], out["ce_labels"]
    n_ce = labels.shape[0]
    ce = F.cross_entropy(logits.float(), labels, reduction="sum") / (
        ce_denominator if ce_denominator is not None else max(n_ce, 1)
    )
    mse = flow_mse(out, mse_denominator)
    det_logits, det_labels = out["det_logits"], out["det_labels"]
    if det_labels.shape[0]:
        label = F.cross_entropy(det_logits.float(), det_labels)
    else:
        label = det_logits.float().sum() * 0.0
    total = ce_weight * ce + mse_weight * mse + label_weight * label
    return {"loss": total, "ce": ce.detach(), "mse": mse.detach(), "label": label.detach()}


def diga_losses(
    out: dict[str, Any],
    *,
    diga_weight: float = 0.5,
    mse_weight: float = 1.0,
    mse_denominator: float | None = None,
) -> dict[str, torch.Tensor]:
    """Stage-2 (DIGA) objective: ``mse_weight*MSE_flow + diga_weight*(1 - mean cos(teacher, student))``.

    The alignment term is :func:`unigendet.ops.diga_loss`, which bilinearly resizes each teacher grid to its
    student grid before the cosine.
    """
    from unigendet.ops import diga_loss

    mse = flow_mse(out, mse_denominator)
    if "diga_student" not in out:
        raise ValueError("out has no DIGA states: the batch passed to forward() had no diga teacher pack")
    align = diga_loss(
        out["diga_student"], out["diga_teacher"], out["diga_student_grids"], out["diga_teacher_grids"]
    )
    total = mse_weight * mse + diga_weight * align
    return {"loss": total, "mse": mse.detach(), "diga": align.detach()}
