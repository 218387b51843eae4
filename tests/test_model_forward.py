"""UniGenDet forward/backward on the tiny preset: routing, packing invariance, losses, SMSA layouts."""

import math

import pytest
import torch

from unigendet.models import UniGenDet, gduf_losses, get_config, smsa_layout
from unigendet.models.reference import bagel_dense_mask, reference_decoder
from unigendet.models.smsa import build_layout
from unigendet.models.synthetic import DetSpec, GenSpec, make_batch


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = get_config("tiny", **overrides)
    m = UniGenDet(cfg)
    # BAGEL zero-initialises llm2vae; give it weights so the flow head's gradient reaches the backbone.
    torch.nn.init.normal_(m.llm2vae.weight, std=0.02)
    return m


SAMPLES = [
    DetSpec(vae_grid=(2, 3), vit_grid=(3, 2), question_len=3, answer_len=4, label=0),
    GenSpec(vae_grid=(4, 4), caption_len=5),
    DetSpec(vae_grid=(4, 2), vit_grid=(4, 4), question_len=2, answer_len=6, label=1),
]


def test_batch_is_expert_contiguous():
    cfg = get_config("tiny")
    b = make_batch(cfg, SAMPLES)
    assert int(b.vae_indexes.min()) >= b.num_und
    assert sorted(b.vae_indexes.tolist()) == list(range(b.num_und, b.seq_len))
    assert int(torch.cat([b.text_indexes, b.vit_indexes]).max()) < b.num_und
    assert b.det_indexes.numel() == 2 and b.mse_indexes.numel() == 16


def test_expert_contiguous_equals_gather_scatter_reference():
    m = _model().double()
    b = make_batch(m.config, SAMPLES)
    b.vit_patches = b.vit_patches.double()
    b.vae_images = [im.double() for im in b.vae_images]
    with torch.no_grad():
        st = m.run(b, generator=torch.Generator().manual_seed(1))
        ref_und, ref_gen = reference_decoder(m.language_model.model, st["h_und"], st["h_gen"], b)
    torch.testing.assert_close(st["und"], ref_und, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st["gen"], ref_gen, rtol=1e-10, atol=1e-10)


def test_reference_dense_mask_matches_layout():
    cfg = get_config("tiny")
    b = make_batch(cfg, SAMPLES)
    dense = torch.block_diag(*bagel_dense_mask(b.splits))
    order = b.order
    expected = dense[order][:, order]  # into the batch's (expert-contiguous) order
    assert torch.equal(b.layout.dense_mask(), expected)


def test_packed_forward_equals_each_sample_alone():
    m = _model()
    m.eval()
    pack = make_batch(m.config, SAMPLES, seed=3)
    g = torch.Generator().manual_seed(7)
    n_lat = pack.vae_indexes.numel()
    noise = torch.randn(n_lat, m.config.patch_latent_dim, generator=g)
    with torch.no_grad():
        out = m(pack, noise=noise)
    # Each sample alone, with its slice of the noise (latent tokens are in sample order).
    lat_off, det_i, ce_i, mse_i = 0, 0, 0, 0
    for k, spec in enumerate(SAMPLES):
        single = make_batch(m.config, [spec], seed=3, sample_offset=k)
        n = single.vae_indexes.numel()
        with torch.no_grad():
            o1 = m(single, noise=noise[lat_off : lat_off + n])
        lat_off += n
        nd, nc, nm = o1["det_logits"].shape[0], o1["ce_logits"].shape[0], o1["flow_pred"].shape[0]
        torch.testing.assert_close(out["det_logits"][det_i : det_i + nd], o1["det_logits"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["ce_logits"][ce_i : ce_i + nc], o1["ce_logits"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["flow_pred"][mse_i : mse_i + nm], o1["flow_pred"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["flow_target"][mse_i : mse_i + nm], o1["flow_target"])
        det_i, ce_i, mse_i = det_i + nd, ce_i + nc, mse_i + nm
    assert (det_i, ce_i, mse_i) == (out["det_logits"].shape[0], out["ce_logits"].shape[0], out["flow_pred"].shape[0])


def test_flow_inputs_follow_the_schedule():
    m = _model()
    b = make_batch(m.config, SAMPLES, seed=5)
    st = m.embed(b, generator=torch.Generator().manual_seed(0))
    t = st["t"]
    img_t = torch.sigmoid(b.vae_noise_logit)[b.vae_image_of_token]
    torch.testing.assert_close(t, img_t)
    clean = torch.isinf(b.vae_noise_logit)[b.vae_image_of_token]
    assert clean.any() and (t[clean] == 0).all() and (t[~clean] > 0).all()
    # the latents are the VAE's encoding of the pack's images: decoding them and encoding again gives them back
    # (the tiny preset's DCT autoencoder is a projection, exact on its own output)
    imgs = m.decode_latents(st["x0"], b.vae_latent_grids)
    assert [tuple(a.shape) for a in imgs] == [tuple(b_.shape) for b_ in b.vae_images]
    torch.testing.assert_close(m.encode_latents(imgs, b.vae_latent_grids), st["x0"], atol=1e-4, rtol=0)
    # the flow target at the loss positions is eps - x0 of the noisy images' tokens
    out = m(b, noise=st["noise"], latents=st["x0"])
    noisy_tok = (~clean).nonzero().squeeze(1)
    torch.testing.assert_close(out["flow_target"], (st["noise"] - st["x0"])[noisy_tok])


def test_forward_backward_gduf_reaches_every_trainable_head():
    m = _model()
    b = make_batch(m.config, SAMPLES, seed=1)
    out = m(b, generator=torch.Generator().manual_seed(0))
    assert out["det_logits"].shape == (2, 2)
    assert out["ce_logits"].shape == (b.ce_indexes.numel(), m.config.llm.vocab_size)
    assert out["flow_pred"].shape == out["flow_target"].shape == (16, m.config.patch_latent_dim)
    losses = gduf_losses(out)
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    # at init the label loss is ~log 2 and the text CE ~log V
    assert abs(float(losses["label"]) - math.log(2)) < 0.1
    assert abs(float(losses["ce"]) - math.log(m.config.llm.vocab_size)) < 0.5
    losses["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    # diga_mlp is only used in stage 2
    assert all(n.startswith("diga_mlp.") for n in missing), missing
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
    lm = m.language_model.model.layers[0]
    assert lm.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert lm.self_attn.q_proj_moe_gen.weight.grad.abs().sum() > 0
    assert m.vit_model.vision_model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_gduf_loss_weights():
    m = _model()
    b = make_batch(m.config, SAMPLES, seed=2)
    with torch.no_grad():
        out = m(b, generator=torch.Generator().manual_seed(0))
    base = gduf_losses(out)
    w = gduf_losses(out, ce_weight=0.0, mse_weight=0.0, label_weight=1.0)
    torch.testing.assert_close(w["loss"], base["label"])
    expected = base["ce"] + base["mse"] + 0.2 * base["label"]
    torch.testing.assert_close(base["loss"], expected)
    manual = torch.nn.functional.cross_entropy(out["det_logits"], b.det_labels)
    torch.testing.assert_close(base["label"], manual)


def test_gradient_checkpointing_gives_same_gradients():
    m = _model()
    b = make_batch(m.config, SAMPLES, seed=4)
    noise = torch.randn(b.vae_indexes.numel(), m.config.patch_latent_dim)
    gduf_losses(m(b, noise=noise))["loss"].backward()
    g1 = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.set_gradient_checkpointing(True)
    gduf_losses(m(b, noise=noise))["loss"].backward()
    for n, p in m.named_parameters():
        if n in g1:
            torch.testing.assert_close(p.grad, g1[n], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- SMSA


def _segments(b):
    """Per sample (BAGEL order), per split: batch positions, plus the split type."""
    new_of_old = torch.empty_like(b.order)
    new_of_old[b.order] = torch.arange(b.seq_len)
    out, pos = [], 0
    for sample in b.splits:
        segs = []
        for length, _ in sample:
            segs.append(new_of_old[pos : pos + length])
            pos += length
        out.append(segs)
    return out


def test_smsa_reference_builder_reproduces_packer_layout():
    cfg = get_config("tiny")
    b = make_batch(cfg, SAMPLES)
    assert smsa_layout(b, "reference") is b.layout
    assert torch.equal(build_layout(b, "reference").dense_mask(), b.layout.dense_mask())


def _vit_latent_markers(seg):
    return seg[1:-1]


@pytest.mark.parametrize("mode", ["reference", "paper", "off"])
def test_smsa_mode_visibility(mode):
    cfg = get_config("tiny")
    b = make_batch(cfg, SAMPLES)
    mask = smsa_layout(b, mode).dense_mask()
    ref = b.layout.dense_mask()
    segs = _segments(b)
    for si, kind in enumerate(b.sample_kind):
        s = segs[si]
        if kind != "det":
            rows = torch.cat(s)
            assert torch.equal(mask[rows], ref[rows]), "generation samples never change"
            continue
        vae, vit, question, answer = s
        latents = _vit_latent_markers(vae)
        vit_tok = _vit_latent_markers(vit)
        sub = mask[vit_tok]
        sees_lat = sub[:, latents].all()
        sees_self = sub[:, vit].all()
        sees_q = sub[:, question].any()
        sees_ans = sub[:, answer].any()
        assert sees_self
        assert not sees_ans, "detection tokens never see the answer"
        if mode == "reference":
            assert sees_lat and not sees_q
        elif mode == "paper":
            assert sees_lat and sub[:, question].all()
        else:
            assert not sub[:, latents].any() and not sees_q
            text_rows = torch.cat([question, answer])
            assert not mask[text_rows][:, latents].any(), "off: no token of the sample sees generative latents"
        # the answer always sees the question causally and the vit image fully
        assert mask[answer][:, vit].all() and mask[answer][:, question].all()
        assert torch.equal(mask[answer][:, answer], torch.ones(len(answer), len(answer), dtype=torch.bool).tril())
        # other samples are never visible
        others = torch.cat([torch.cat(x) for j, x in enumerate(segs) if j != si])
        assert not mask[torch.cat(s)][:, others].any()


def test_smsa_modes_change_detection_outputs_only():
    m = _model()
    b = make_batch(m.config, SAMPLES, seed=6)
    noise = torch.randn(b.vae_indexes.numel(), m.config.patch_latent_dim)
    with torch.no_grad():
        ref = m(b, noise=noise)
        paper = m(b, noise=noise, layout=smsa_layout(b, "paper"))
    assert not torch.allclose(ref["det_logits"], paper["det_logits"])
    # the generation sample's flow prediction is unaffected by a detection-only mask change
    torch.testing.assert_close(ref["flow_pred"], paper["flow_pred"])


# ---------------------------------------------------------------- sampling helpers


def test_velocity_matches_training_flow_prediction_and_drives_the_sampler():
    from unigendet.sampling import flow_euler_sample

    m = _model()
    m.eval()
    cond = make_batch(m.config, [GenSpec(vae_grid=(2, 3), caption_len=4)], seed=8)
    uncond = make_batch(m.config, [GenSpec(vae_grid=(2, 3), caption_len=0)], seed=8)
    noise = torch.randn(6, m.config.patch_latent_dim)
    with torch.no_grad():
        st = m.embed(cond, noise=noise)
        out = m(cond, noise=noise, latents=st["x0"])
        x_t = (1 - st["t"][:, None]) * st["x0"] + st["t"][:, None] * noise
        v = m.velocity(cond, x_t, st["t"])
    torch.testing.assert_close(v, out["flow_pred"].float())
    fn = m.velocity_fn({"cond": cond, "uncond": uncond})
    x = flow_euler_sample(fn, torch.randn(6, m.config.patch_latent_dim), num_steps=3, text_scale=4.0)
    assert x.shape == (6, m.config.patch_latent_dim) and torch.isfinite(x).all()


def test_config_smsa_mode_selects_the_layout():
    m = _model()
    b = make_batch(m.config, SAMPLES, seed=9)
    noise = torch.randn(b.vae_indexes.numel(), m.config.patch_latent_dim)
    with torch.no_grad():
        explicit = m(b, noise=noise, layout=smsa_layout(b, "off"))
        m.config.smsa_mode = "off"
        implicit = m(b, noise=noise)
        m.config.smsa_mode = "reference"
        ref = m(b, noise=noise)
    torch.testing.assert_close(implicit["det_logits"], explicit["det_logits"])
    assert not torch.allclose(ref["det_logits"], implicit["det_logits"])
