"""Configs, checkpoint IO in BAGEL's key space, the FLUX AE converter, and the 7B meta build."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from unigendet.models import UniGenDet, VAEConfig, get_config, load_config, save_config
from unigendet.models.checkpoint import (
    INDEX_NAME,
    build_model,
    checkpoint_state_dict,
    load_pretrained,
    resolve_checkpoint,
    save_checkpoint,
)
from unigendet.models.vae import diffusers_to_flux_ae, flux_ae_to_diffusers


def _tiny_flux_config():
    # The tiny preset with a (very small) real FLUX-architecture AE instead of the pixel stand-in.
    vae = VAEConfig(
        kind="flux", z_channels=4, downsample=8, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, scale_factor=0.3611, shift_factor=0.1159, sample_posterior=False,
    )
    return get_config("tiny", vae=vae)


def _write_bagel_folder(folder, model, *, extra_keys=None, drop_keys=()):
    """A folder laid out like the BAGEL-7B-MoT download: JSON configs, ema.safetensors, FLUX-format ae."""
    os.makedirs(folder, exist_ok=True)
    save_config(model.config, folder)
    state = {k: v.contiguous().clone() for k, v in checkpoint_state_dict(model).items() if k not in drop_keys}
    state.update(extra_keys or {})
    save_file(state, os.path.join(folder, "ema.safetensors"))
    if model.vae is not None and model.config.vae.kind == "flux":
        ae = diffusers_to_flux_ae({k: v.contiguous() for k, v in model.vae.model.state_dict().items()})
        save_file(ae, os.path.join(folder, "ae.safetensors"))
    # BAGEL's index lists both files
    idx = {"weight_map": {**{k: "ema.safetensors" for k in state}}}
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump(idx, f)
    return state


def _assert_same_weights(a: UniGenDet, b: UniGenDet):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("preset", ["tiny", "bagel-7b-mot"])
def test_config_json_round_trip(tmp_path, preset):
    cfg = get_config(preset)
    save_config(cfg, str(tmp_path))
    llm = json.loads((tmp_path / "llm_config.json").read_text())
    vit = json.loads((tmp_path / "vit_config.json").read_text())
    assert llm["model_type"] == "qwen2" and llm["num_key_value_heads"] == cfg.llm.num_key_value_heads
    assert vit["num_hidden_layers"] == cfg.vit.num_hidden_layers  # as in the file, before truncation
    assert load_config(str(tmp_path)) == cfg


def test_bagel_folder_without_extras_gets_bagel_defaults(tmp_path):
    cfg = get_config("bagel-7b-mot")
    (tmp_path / "llm_config.json").write_text(json.dumps(cfg.llm.to_hf_dict()))
    (tmp_path / "vit_config.json").write_text(json.dumps(cfg.vit.to_hf_dict()))
    got = load_config(str(tmp_path))
    assert got == cfg
    assert got.vit.num_layers == 26 and got.vit.num_hidden_layers == 27
    assert (got.llm.head_dim, got.llm.num_key_value_heads, got.llm.intermediate_size) == (128, 4, 18944)
    assert (got.vae.scale_factor, got.vae.shift_factor, got.latent_downsample) == (0.3611, 0.1159, 16)


def test_bagel_7b_builds_on_meta_with_expected_sizes():
    cfg = get_config("bagel-7b-mot")
    m = build_model(cfg, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta for p in m.parameters()) and all(b.is_meta for b in m.buffers())
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    llm, vit = count(m.language_model), count(m.vit_model)
    print(f"bagel-7b-mot: LLM {llm / 1e9:.3f}B, ViT {vit / 1e9:.3f}B, VAE {count(m.vae) / 1e6:.1f}M, "
          f"total (no VAE) {sum(v.numel() for v in checkpoint_state_dict(m).values()) / 1e9:.3f}B")
    # Hand count: per layer 2 x (attention 3584*(3584+2*512) + biases + o_proj 3584^2 + MLP 3*3584*18944 + norms)
    h, kv, f, layers, vocab = 3584, 512, 18944, 28, 152064
    per_expert = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * f + 2 * 128 + 2 * h
    assert llm == layers * 2 * per_expert + 2 * vocab * h + 2 * h
    assert 14.0e9 < llm < 14.2e9
    vit_layer = 4 * (1152 * 1152 + 1152) + 2 * 1152 * 4304 + 4304 + 1152 + 4 * 1152
    assert vit == 26 * vit_layer + 588 * 1152 + 1152 + 4900 * 1152 + 2 * 1152
    assert 0.39e9 < vit < 0.41e9
    assert m.fake_cls_head[1].weight.shape == (896, 3584) and m.diga_mlp[0].weight.shape == (14336, 3584)
    names = set(checkpoint_state_dict(m))
    for key in (
        "language_model.model.layers.27.self_attn.q_proj_moe_gen.bias",
        "language_model.model.layers.0.self_attn.k_norm_moe_gen.weight",
        "language_model.model.layers.3.mlp_moe_gen.down_proj.weight",
        "language_model.model.layers.3.input_layernorm_moe_gen.weight",
        "language_model.model.layers.3.post_attention_layernorm_moe_gen.weight",
        "language_model.model.norm_moe_gen.weight",
        "language_model.lm_head.weight",
        "vit_model.vision_model.embeddings.patch_embedding.weight",
        "vit_model.vision_model.embeddings.position_embedding.weight",
        "vit_model.vision_model.encoder.layers.25.self_attn.out_proj.weight",
        "vit_model.vision_model.post_layernorm.weight",
        "connector.fc2.weight",
        "vit_pos_embed.pos_embed",
        "latent_pos_embed.pos_embed",
        "vae2llm.weight",
        "llm2vae.bias",
        "time_embedder.mlp.2.weight",
        "fake_cls_head.3.weight",
        "diga_mlp.2.bias",
    ):
        assert key in names, key
    assert "vit_model.vision_model.encoder.layers.26.mlp.fc1.weight" not in names


def test_flux_ae_converter_matches_diffusers_and_inverts():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = _tiny_flux_config()
    m = UniGenDet(cfg)
    sd = m.vae.model.state_dict()
    flux = diffusers_to_flux_ae(sd)
    assert "encoder.down.0.block.0.norm1.weight" in flux and "decoder.up.3.upsample.conv.weight" in flux
    assert flux["encoder.mid.attn_1.q.weight"].dim() == 4
    back = flux_ae_to_diffusers(flux)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    theirs = convert_ldm_vae_checkpoint(flux, dict(m.vae.model.config))
    assert theirs.keys() == sd.keys()
    assert all(torch.equal(theirs[k].reshape(sd[k].shape), back[k]) for k in sd)


def test_load_bagel_folder_complete_and_exact(tmp_path):
    torch.manual_seed(0)
    src = UniGenDet(_tiny_flux_config())
    folder = str(tmp_path / "base")
    _write_bagel_folder(folder, src)
    loaded = load_pretrained(folder, dtype=torch.float32, load_tokenizer=False)
    r = loaded.report
    assert r.missing == [] and r.unexpected == [], str(r)
    assert set(r.ignored) == {"vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed"}
    _assert_same_weights(src, loaded.model)
    # the VAE came from the FLUX-format file: same encoding
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.vae.encode(img), src.vae.encode(img))


def test_bf16_materialisation(tmp_path):
    torch.manual_seed(0)
    src = UniGenDet(_tiny_flux_config())
    folder = str(tmp_path / "base")
    _write_bagel_folder(folder, src)
    m = load_pretrained(folder, dtype=torch.bfloat16, load_tokenizer=False, vae_dtype=torch.float32).model
    assert all(p.dtype == torch.bfloat16 for k, p in m.named_parameters() if not k.startswith("vae."))
    w = m.language_model.model.layers[1].mlp_moe_gen.up_proj.weight
    assert torch.equal(w, src.language_model.model.layers[1].mlp_moe_gen.up_proj.weight.to(torch.bfloat16))


def test_base_checkpoint_report_lists_missing_unexpected_and_ignored(tmp_path):
    torch.manual_seed(0)
    src = UniGenDet(_tiny_flux_config())
    folder = str(tmp_path / "base")
    extra = {
        "bogus.weight": torch.zeros(3),
        "latent_to_vit_connector.0.weight": torch.zeros(64, 64),  # built but never used by the reference
        "vit_model.vision_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(192, 64),  # truncated layer
    }
    _write_bagel_folder(folder, src, extra_keys=extra, drop_keys=("fake_cls_head.1.weight", "diga_mlp.0.bias"))
    r = load_pretrained(folder, dtype=torch.float32, load_tokenizer=False).report
    assert r.unexpected == ["bogus.weight"]
    assert r.missing == ["diga_mlp.0.bias", "fake_cls_head.1.weight"]
    assert "latent_to_vit_connector.0.weight" in r.ignored
    assert "vit_model.vision_model.encoder.layers.2.mlp.fc1.weight" in r.ignored
    with pytest.raises(ValueError, match="incomplete load"):
        load_pretrained(folder, dtype=torch.float32, load_tokenizer=False, strict=True)


def test_finetuned_checkpoint_merges_missing_keys_from_base(tmp_path):
    torch.manual_seed(0)
    base_model = UniGenDet(_tiny_flux_config())
    folder = str(tmp_path / "base")
    _write_bagel_folder(folder, base_model)
    torch.manual_seed(1)
    tuned = UniGenDet(_tiny_flux_config())
    # a stage-2 style file: only the generation expert and heads
    part = {k: v.contiguous() for k, v in checkpoint_state_dict(tuned).items()
            if "moe_gen" in k or k.startswith(("fake_cls_head.", "diga_mlp."))}
    ck = str(tmp_path / "tuned.safetensors")
    save_file(part, ck)
    out = load_pretrained(folder, ck, dtype=torch.float32, load_tokenizer=False)
    assert out.report.complete, str(out.report)
    got = checkpoint_state_dict(out.model)
    for k, v in checkpoint_state_dict(base_model).items():
        want = part[k] if k in part else v
        assert torch.equal(got[k], want), k
    assert out.report.sources[ck] == len(part)


def test_save_load_round_trip_bit_exact_sharded(tmp_path):
    torch.manual_seed(0)
    cfg = _tiny_flux_config()
    src = UniGenDet(cfg)
    base = str(tmp_path / "base")
    _write_bagel_folder(base, src)
    m = load_pretrained(base, dtype=torch.bfloat16, load_tokenizer=False).model
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # make it differ from base
    out = str(tmp_path / "ckpt")
    names = save_checkpoint(m, out, max_shard_bytes=200_000)
    assert len(names) > 1
    index = json.loads(open(os.path.join(out, INDEX_NAME)).read())
    assert set(index["weight_map"]) == set(checkpoint_state_dict(m))
    assert not any(k.startswith("vae.") for k in index["weight_map"])
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    for form in (out, os.path.join(out, INDEX_NAME), ",".join(os.path.join(out, n) for n in names)):
        loaded = load_pretrained(base, form, dtype=torch.bfloat16, load_tokenizer=False)
        assert loaded.report.complete, str(loaded.report)
        sa, sb = checkpoint_state_dict(m), checkpoint_state_dict(loaded.model)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the saved folder is itself a base folder (configs written) except for the VAE file
    assert load_config(out) == cfg
    # overwriting is atomic: the folder is replaced as a whole
    save_checkpoint(m, out, max_shard_bytes=10**9)
    assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == ["model-00001-of-00001.safetensors"]


def test_resolve_checkpoint_forms_and_errors(tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file({"x": torch.zeros(2)}, a)
    save_file({"y": torch.zeros(2)}, b)
    assert resolve_checkpoint(f"{a},{b}") == {"x": a, "y": b}
    assert resolve_checkpoint(str(tmp_path)) == {"x": a, "y": b}
    save_file({"x": torch.ones(2)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="appears in both"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError):
        resolve_checkpoint(str(tmp_path / "weights.bin"))


def test_shape_mismatch_is_an_error(tmp_path):
    torch.manual_seed(0)
    src = UniGenDet(_tiny_flux_config())
    folder = str(tmp_path / "base")
    _write_bagel_folder(folder, src, extra_keys={"connector.fc1.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match="connector.fc1.bias"):
        load_pretrained(folder, dtype=torch.float32, load_tokenizer=False)


def test_saved_state_matches_loaded_files_exactly(tmp_path):
    torch.manual_seed(0)
    m = UniGenDet(get_config("tiny"))
    out = str(tmp_path / "ck")
    save_checkpoint(m, out)
    files = resolve_checkpoint(out)
    state = {}
    for f in set(files.values()):
        state.update(load_file(f))
    ref = checkpoint_state_dict(m)
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


def test_conv_patch_embedding_is_converted_on_load(tmp_path):
    torch.manual_seed(0)
    src = UniGenDet(get_config("tiny"))
    key = "vit_model.vision_model.embeddings.patch_embedding.weight"
    lin = checkpoint_state_dict(src)[key]
    p, c = src.config.vit.patch_size, src.config.vit.num_channels
    conv = lin.reshape(lin.shape[0], p, p, c).permute(0, 3, 1, 2).contiguous()  # (out, C, P, P)
    folder = str(tmp_path / "base")
    save_config(src.config, folder)
    state = {k: v.contiguous() for k, v in checkpoint_state_dict(src).items()}
    state[key] = conv
    save_file(state, os.path.join(folder, "ema.safetensors"))
    got = load_pretrained(folder, dtype=torch.float32, load_tokenizer=False)
    assert got.report.complete
    assert torch.equal(checkpoint_state_dict(got.model)[key], lin)
    # and the linear form computes the same as the convolution on a (row, col, channel)-ordered patch
    img = torch.rand(1, c, p, p)
    patch = img[0].permute(1, 2, 0).reshape(1, -1)
    torch.testing.assert_close(patch @ lin.T, torch.nn.functional.conv2d(img, conv).reshape(1, -1))
