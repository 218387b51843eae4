"""The model on batches from the real data packer (tiny tokenizer, tiny packing sizes)."""


import numpy as np
import pytest
import torch

from unigendet.data.packing import PackingConfig, build_diga_batch, build_packed_batch, plan_detection, plan_generation
from unigendet.data.readers import DetectionRecord, GenerationRecord
from unigendet.models import UniGenDet, diga_losses, gduf_losses, get_config, smsa_layout
from unigendet.models.reference import reference_decoder


def _pack(tok, cfg):
    plans = [
        plan_detection(
            DetectionRecord("d0", "/x/d0.png", 0, "photo", "<image>Does the image looks real/fake?",
                            "This is a fake image. Checkerboard artifacts."), tok, cfg, (64, 48)),
        plan_generation(GenerationRecord("g0", "/x/g0.png", "a photo of a tabby cat"), tok, cfg, (64, 64),
                        np.random.default_rng(0)),
        plan_detection(
            DetectionRecord("d1", "/x/d1.png", 1, "photo", "<image>Does the image looks real/fake?",
                            "This is a real image."), tok, cfg, (48, 64)),
    ]
    g = torch.Generator().manual_seed(0)
    images = []
    for p in plans:
        w, h = p.size
        vw, vh = cfg.vit.size_for(w, h)
        aw, ah = cfg.vae.size_for(w, h)
        images.append({"vit": torch.rand(3, vh, vw, generator=g) * 2 - 1,
                       "vae": torch.rand(3, ah, aw, generator=g) * 2 - 1})
    b = build_packed_batch(plans, images, tok, cfg)
    b.diga = build_diga_batch(plans, images, b, tok, cfg)
    return b


def _model():
    torch.manual_seed(0)
    m = UniGenDet(get_config("tiny"))
    torch.nn.init.normal_(m.llm2vae.weight, std=0.02)
    return m


@pytest.mark.parametrize("preset,packing", [("tiny", PackingConfig.tiny), ("bagel-7b-mot", PackingConfig.bagel)])
def test_model_and_packer_sizes_agree(preset, packing):
    cfg, pc = get_config(preset), packing()
    assert pc.vit_patch == cfg.vit.patch_size
    assert pc.vit_max_patches_per_side == cfg.vit_max_num_patch_per_side
    assert pc.max_latent_size == cfg.max_latent_size
    assert pc.vae.stride == cfg.latent_downsample


def test_tokenizer_fits_the_tiny_embedding(tok):
    assert tok.vocab_size <= get_config("tiny").llm.vocab_size


def test_packer_batch_forward_backward_all_heads(tok):
    m = _model()
    b = _pack(tok, PackingConfig.tiny(diga=True, text_cond_dropout_prob=0.0))
    assert b.diga is not None
    out = m(b, generator=torch.Generator().manual_seed(0))
    assert out["det_logits"].shape == (2, 2)
    assert out["ce_logits"].shape[0] == b.ce_labels.shape[0] > 0
    assert out["flow_pred"].shape[0] == b.mse_indexes.shape[0] > 0
    loss = gduf_losses(out)["loss"] + diga_losses(out)["loss"]
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], missing


def test_packer_batch_matches_gather_scatter_reference(tok):
    m = _model().double()
    b = _pack(tok, PackingConfig.tiny(text_cond_dropout_prob=0.0))
    b.vit_patches = b.vit_patches.double()
    b.vae_images = [x.double() for x in b.vae_images]
    with torch.no_grad():
        st = m.run(b, generator=torch.Generator().manual_seed(0))
        ref_und, ref_gen = reference_decoder(m.language_model.model, st["h_und"], st["h_gen"], b)
    torch.testing.assert_close(st["und"], ref_und, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st["gen"], ref_gen, rtol=1e-10, atol=1e-10)


def test_packer_batch_smsa_paper_lets_vit_see_question(tok):
    b = _pack(tok, PackingConfig.tiny(text_cond_dropout_prob=0.0))
    ref, paper = b.layout.dense_mask(), smsa_layout(b, "paper").dense_mask()
    vit = b.vit_indexes
    grew = (paper[vit] & ~ref[vit]).any(1)
    assert grew.all(), "every detection ViT token gains the question"
    assert not (ref & ~paper).any(), "paper mode only adds visibility"
    others = torch.ones(b.seq_len, dtype=torch.bool)
    others[vit] = False
    cu = b.vit_cu_seqlens.tolist()
    for i in range(len(cu) - 1):  # the ViT split's <|vision_start|>/<|vision_end|> markers belong to it
        toks = vit[cu[i] : cu[i + 1]]
        others[toks.min() - 1] = others[toks.max() + 1] = False
        assert paper[toks.min() - 1].equal(paper[toks[0]])
    assert torch.equal(paper[others], ref[others])


def test_load_pretrained_brings_the_folder_tokenizer(tok, tmp_path):
    from unigendet.models import checkpoint_state_dict, load_pretrained, save_checkpoint

    torch.manual_seed(0)
    m = UniGenDet(get_config("tiny"))
    folder = str(tmp_path / "base")
    save_checkpoint(m, folder)
    tok.save(folder)
    loaded = load_pretrained(folder, dtype=torch.float32)
    assert loaded.report.complete, str(loaded.report)
    assert loaded.tokenizer.vocab_size == tok.vocab_size
    assert loaded.tokenizer.encode("a tabby cat") == tok.encode("a tabby cat")
    sa, sb = checkpoint_state_dict(m), checkpoint_state_dict(loaded.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
