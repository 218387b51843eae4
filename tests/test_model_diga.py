"""DIGA (stage 2): student states at layer l, the frozen teacher pass, and the alignment loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from unigendet.models import UniGenDet, diga_losses, get_config
from unigendet.models.synthetic import DetSpec, GenSpec, make_batch

SAMPLES = [
    GenSpec(vae_grid=(4, 4), caption_len=5, vit_grid=(2, 3), prompt_len=3),
    DetSpec(vae_grid=(2, 2), vit_grid=(2, 2)),
    GenSpec(vae_grid=(2, 4), caption_len=3, vit_grid=(4, 4), prompt_len=4),
]


def _model():
    torch.manual_seed(0)
    m = UniGenDet(get_config("tiny"))
    torch.nn.init.normal_(m.llm2vae.weight, std=0.02)
    return m


def _reference_diga(student, teacher, sgrids, tgrids):
    """1 - mean cos(student token, bilinearly resized teacher token), over all student tokens."""
    cos, so, to = [], 0, 0
    for (sh, sw), (th, tw) in zip(sgrids, tgrids):
        s = student[so : so + sh * sw].float()
        t = teacher[to : to + th * tw].float().reshape(th, tw, -1).permute(2, 0, 1)[None]
        t = F.interpolate(t, size=(sh, sw), mode="bilinear", align_corners=False)
        t = t[0].permute(1, 2, 0).reshape(sh * sw, -1)
        cos.append(F.cosine_similarity(s, t, dim=-1))
        so, to = so + sh * sw, to + th * tw
    return 1 - torch.cat(cos).mean()


def test_diga_student_and_teacher_states():
    m = _model()
    b = make_batch(m.config, SAMPLES, seed=0, diga=True)
    tb = b.diga
    assert tb.student_image_ids.tolist() == [0, 2]
    noise = torch.randn(b.vae_indexes.numel(), m.config.patch_latent_dim)
    out = m(b, noise=noise)
    l = m.config.diga_layer
    assert out["diga_student"].shape == (16 + 8, m.config.llm.hidden_size)
    assert out["diga_teacher"].shape == (6 + 16, m.config.llm.hidden_size)
    assert out["diga_student_grids"] == [(4, 4), (2, 4)] and out["diga_teacher_grids"] == [(2, 3), (4, 4)]
    assert not out["diga_teacher"].requires_grad

    # Student: raw (un-normalised) residual stream after layer l at the images' latent tokens, through diga_mlp.
    with torch.no_grad():
        st = m.run(b, noise=noise, capture_layer=l)
        pos = (b.vae_indexes - b.num_und)[torch.cat([torch.arange(0, 16), torch.arange(20, 28)])]
        torch.testing.assert_close(out["diga_student"], m.diga_mlp(st["captured_gen"][pos]))
        # Teacher: first l layers on the teacher pack (clean latents of the same images), final norm, ViT tokens.
        x0 = st["x0"][torch.cat([torch.arange(0, 16), torch.arange(20, 28)])]
        ts = m.run(tb, latents=x0, num_layers=l)
        torch.testing.assert_close(out["diga_teacher"], ts["und"][tb.teacher_vit_indexes])
        # the teacher latents are the student's clean latents of the same pixels
        enc = m.encode_latents(tb.vae_images, tb.vae_latent_grids)
        torch.testing.assert_close(enc, x0)


def test_frozen_teacher_copy_matches_live_model_and_stays_frozen():
    m = _model()
    teacher = m.make_diga_teacher()
    assert len(teacher.language_model.model.layers) == m.config.diga_layer
    assert teacher.vae is m.vae
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for n, p in m.named_parameters() if not n.startswith("vae.")), "student untouched"
    assert teacher.language_model.lm_head is None and teacher.diga_mlp is None
    assert teacher.language_model.model.layers[0].mlp.up_proj.weight.data_ptr() != (
        m.language_model.model.layers[0].mlp.up_proj.weight.data_ptr()
    )
    b = make_batch(m.config, SAMPLES, seed=1, diga=True)
    noise = torch.randn(b.vae_indexes.numel(), m.config.patch_latent_dim)
    live = m(b, noise=noise)
    frozen = m(b, noise=noise, diga_teacher=teacher)
    torch.testing.assert_close(live["diga_teacher"], frozen["diga_teacher"])
    # training the student does not move the frozen copy
    with torch.no_grad():
        m.language_model.model.layers[0].self_attn.q_proj_moe_gen.weight.add_(1.0)
    again = m(b, noise=noise, diga_teacher=teacher)
    torch.testing.assert_close(again["diga_teacher"], frozen["diga_teacher"])


def test_diga_forward_backward_and_loss():
    m = _model()
    teacher = m.make_diga_teacher()
    b = make_batch(m.config, SAMPLES, seed=2, diga=True)
    out = m(b, generator=torch.Generator().manual_seed(0), diga_teacher=teacher)
    losses = diga_losses(out)
    ref = _reference_diga(out["diga_student"].detach(), out["diga_teacher"], out["diga_student_grids"],
                          out["diga_teacher_grids"])
    torch.testing.assert_close(losses["diga"], ref, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(losses["loss"].detach()))
    torch.testing.assert_close(losses["loss"].detach(), losses["mse"] + 0.5 * losses["diga"])
    losses["loss"].backward()
    l = m.config.diga_layer
    layers = m.language_model.model.layers
    assert m.diga_mlp[0].weight.grad is not None and m.diga_mlp[0].weight.grad.abs().sum() > 0
    assert layers[l - 1].mlp_moe_gen.up_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_configure_stage_freezes_all_but_the_generator():
    m = _model()
    gduf = set(m.configure_stage("gduf"))
    assert gduf == {n for n, _ in m.named_parameters()}  # the tiny VAE stand-in has no parameters
    diga = set(m.configure_stage("diga"))
    assert "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight" in diga
    assert "language_model.model.layers.1.mlp_moe_gen.gate_proj.weight" in diga
    assert "language_model.model.norm_moe_gen.weight" in diga and "diga_mlp.0.weight" in diga
    for frozen in ("language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.norm.weight",
                   "language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                   "vit_model.vision_model.post_layernorm.weight", "connector.fc1.weight",
                   "fake_cls_head.1.weight"):
        assert frozen not in diga and not m.get_parameter(frozen).requires_grad
    with pytest.raises(ValueError, match="stage"):
        m.configure_stage("pretrain")
