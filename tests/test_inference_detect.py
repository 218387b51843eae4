"""Detection inference: static-KV-cache decoding equals full recomputation, cache mechanics, the Detector API."""

import numpy as np
import pytest
import torch
from PIL import Image

from unigendet.data import PackingConfig
from unigendet.data.packing import build_packed_batch
from unigendet.eval import parse_verdict
from unigendet.inference import Detector, StaticKVCache, decode_answers, detection_plan, split_explanation
from unigendet.models import UniGenDet, get_config, smsa_layout
from unigendet.sampling import SamplingConfig
from unigendet.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UniGenDet(get_config("tiny")).float().eval()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # Two sizes: the samples of one pack have different token counts.
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 80), (48, 48))]


@pytest.mark.parametrize("mode", ["reference", "paper", "off"])
def test_cached_decoding_matches_full_recompute(model, tok, images, mode):
    packing = PackingConfig.tiny()
    det = Detector(model, tok, packing, smsa=mode)
    qids = det._question_ids(det.question)
    prefill = det.build_prefill(images, [det.question] * len(images))
    res = decode_answers(model, prefill, start_token_id=tok.im_start_id, eos_token_id=tok.im_end_id,
                         max_new_tokens=5, smsa_mode=mode, return_logits=True)
    steps = res["step_logits"].shape[1]
    assert steps == 5
    for i, img in enumerate(images):
        answer = res["tokens"][i]
        assert len(answer) <= steps
        # The whole sequence at once: [VAE] [ViT] [question] [<|im_start|> answer <|im_end|>], no cache.
        plan, x = detection_plan(img, qids, packing, answer_ids=answer)
        full = build_packed_batch([plan], [x], tok, packing)
        with torch.no_grad():
            st = model.run(full, layout=smsa_layout(full, mode))
            ce_logits = model.language_model.lm_head(st["und"][full.ce_indexes])
            det_logits = model.fake_cls_head(st["und"][full.det_indexes])
        n = len(answer) + (1 if res["finished"][i] else 0)
        n = min(n, steps)
        torch.testing.assert_close(res["step_logits"][i, :n], ce_logits[:n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res["det_logits"][i], det_logits[0], rtol=1e-4, atol=1e-5)
        # Greedy: every decoded token is the arg-max of the recomputed logits before it.
        assert answer == ce_logits[: len(answer)].argmax(-1).tolist()


def test_smsa_off_differs_from_reference(model, tok, images):
    packing = PackingConfig.tiny()
    outs = {}
    for mode in ("reference", "off"):
        det = Detector(model, tok, packing, smsa=mode)
        prefill = det.build_prefill(images[:1], [det.question])
        outs[mode] = decode_answers(model, prefill, start_token_id=tok.im_start_id, eos_token_id=tok.im_end_id,
                                    max_new_tokens=1, smsa_mode=mode)["det_logits"]
    # "off" hides the generative latents from the text: the head must see a different context.
    assert not torch.allclose(outs["reference"], outs["off"])


def test_decoding_stops_at_eos_with_periodic_check(model, tok, images):
    packing = PackingConfig.tiny()
    det = Detector(model, tok, packing)
    prefill = det.build_prefill(images, [det.question] * 2)
    m = UniGenDet(get_config("tiny")).float().eval()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        m.language_model.lm_head.weight.zero_()  # all logits equal: greedy picks id 0
    res = decode_answers(m, prefill, start_token_id=tok.im_start_id, eos_token_id=0, max_new_tokens=20,
                         check_every=3, return_logits=True)
    assert res["tokens"] == [[], []] and res["finished"] == [True, True]
    assert res["step_logits"].shape[1] == 3  # stopped at the first check, not at the limit


def test_static_cache_attention_and_in_place_writes():
    torch.manual_seed(1)
    hkv, d, h = 2, 8, 4
    cache = StaticKVCache(2, [5, 3], hkv, d, dtype=torch.float32, device="cpu")
    k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
    pre = [torch.randn(2, hkv, d), torch.randn(1, hkv, d)]
    for layer in range(2):
        keys = torch.cat(pre)
        cache.fill(layer, keys, keys * 2, torch.tensor([0, 1, 5]))
    cache.set_prefix_lengths([2, 1])
    seqs = [list(pre[0]), list(pre[1])]
    for _ in range(2):
        q = torch.randn(2, h, d)
        k_new = torch.randn(2, hkv, d)
        cache.begin_step()
        for layer in range(2):
            cache.write(layer, k_new, k_new * 2)
        out = cache.attend(1, q)
        cache.end_step()
        for b in range(2):
            seqs[b].append(k_new[b])
            ks = torch.stack(seqs[b])  # (L, Hkv, D)
            kk = ks.repeat_interleave(h // hkv, dim=1).transpose(0, 1)  # (H, L, D)
            ref = torch.softmax(q[b][:, None] @ kk.transpose(1, 2) / d**0.5, -1) @ (2 * kk)
            torch.testing.assert_close(out[b], ref[:, 0], rtol=1e-5, atol=1e-6)
    assert cache.lengths.tolist() == [4, 3] and cache.lengths_host == [4, 3]
    assert cache.k.data_ptr() == k_ptr and cache.v.data_ptr() == v_ptr
    with pytest.raises(ValueError, match="full"):
        cache.begin_step()  # sequence 1 has 3 slots, all used
    with pytest.raises(ValueError, match="lengths"):
        cache.set_prefix_lengths([9, 0])


def test_detector_results_and_batching(model, tok, images):
    packing = PackingConfig.tiny()
    det = Detector(model, tok, packing, max_new_tokens=4)
    one = det.detect(images, batch_size=1, progress=False)
    two = det.detect(images, batch_size=2, progress=False)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a.text == b.text
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-5)
        assert a.label == int(np.argmax(a.logits))
        assert 0.0 <= a.prob_fake <= 1.0
        assert abs(a.prob_fake - torch.softmax(torch.tensor(a.logits), -1)[0].item()) < 1e-6
        assert a.text_label == parse_verdict(a.text)
        assert a.num_tokens <= 4


def test_detector_sampling_is_seeded(model, tok, images):
    det = Detector(model, tok, PackingConfig.tiny(), sampling=SamplingConfig.paper(), max_new_tokens=4)
    a = det.detect(images, seed=5, progress=False)
    b = det.detect(images, seed=5, progress=False)
    assert [r.text for r in a] == [r.text for r in b]


def test_detector_rejects_bad_arguments(model, tok):
    with pytest.raises(ValueError, match="smsa"):
        Detector(model, tok, PackingConfig.tiny(), smsa="both")
    with pytest.raises(ValueError, match="max_new_tokens"):
        Detector(model, tok, PackingConfig.tiny(), max_new_tokens=0)
    with pytest.raises(ValueError, match="images"):
        Detector(model, tok, PackingConfig.tiny()).detect([3], progress=False)


def test_detector_skips_unreadable_images(model, tok, images, tmp_path):
    from unigendet.data.readers import DataError

    good, trunc = tmp_path / "good.png", tmp_path / "trunc.jpg"
    images[0].save(good)
    images[1].save(trunc, format="JPEG")
    trunc.write_bytes(trunc.read_bytes()[:300])  # a readable header, truncated pixels
    det = Detector(model, tok, PackingConfig.tiny(), max_new_tokens=2)
    paths = [str(good), str(trunc), str(tmp_path / "none.png"), str(tmp_path)]
    res = det.detect(paths, batch_size=2, skip_unreadable=True, progress=False)
    assert res[0].error is None and res[0].label in (0, 1)
    assert res[0].text == det.detect([str(good)], progress=False)[0].text
    assert res[1].error.startswith("not a readable image")
    assert res[2].error == "no such file" and res[3].error == "a folder, not an image file"
    assert all(r.label == -1 and r.source == p for r, p in zip(res[1:], paths[1:]))
    assert res[1].to_dict()["prob_fake"] is None
    with pytest.raises(DataError, match="corrupt_image"):
        det.detect([str(trunc)], progress=False)


def test_detector_prompt_styles(model, tok):
    from unigendet.prompts import OFFICIAL_FORMAT_SUFFIX

    assert Detector(model, tok, PackingConfig.tiny()).max_new_tokens == 1000  # the official limit
    plain = Detector(model, tok, PackingConfig.tiny())
    official = Detector(model, tok, PackingConfig.tiny(), prompt_style="official")
    q = "<image>Does the image looks real/fake?"
    assert tok.decode(plain._question_ids(q)) == "Does the image looks real/fake?"
    assert tok.decode(official._question_ids(q)) == "Does the image looks real/fake?" + OFFICIAL_FORMAT_SUFFIX
    with pytest.raises(ValueError, match="prompt style"):
        Detector(model, tok, PackingConfig.tiny(), prompt_style="chatty")


def test_split_explanation():
    assert split_explanation("This is a fake image. The edges are jagged.") == "The edges are jagged."
    assert split_explanation("this is a REAL image: clean gradients") == "clean gradients"
    assert split_explanation("no verdict here ") == "no verdict here"


def _cache_with_prefix(dtype, device):
    torch.manual_seed(2)
    hkv, d = 2, 32
    cache = StaticKVCache(1, [7, 4, 5], hkv, d, dtype=dtype, device=device)
    n = 3 + 1 + 2
    keys, vals = torch.randn(n, hkv, d, dtype=dtype), torch.randn(n, hkv, d, dtype=dtype)
    cache.fill(0, keys.to(device), vals.to(device), torch.tensor([0, 1, 2, 7, 11, 12], device=device))
    cache.set_prefix_lengths([3, 1, 2])
    cache.begin_step()
    cache.write(0, torch.randn(3, hkv, d, dtype=dtype).to(device), torch.randn(3, hkv, d, dtype=dtype).to(device))
    return cache


@pytest.mark.interpret
def test_decode_plan_runs_on_the_triton_kernel():
    """The in-place decode plan is a valid kernel plan: Triton (interpreter on CPU) equals the reference."""
    from unigendet.ops import attention_triton
    from unigendet.ops.attention import packed_attention_reference

    cache = _cache_with_prefix(torch.float32, "cpu")
    q = torch.randn(3, 4, 32)
    plan = cache._layout.plan
    ref, _ = packed_attention_reference(q, [cache.k[0]], [cache.v[0]], plan, 32**-0.5)
    out, _ = attention_triton.packed_attention_fwd_triton(q, [cache.k[0]], [cache.v[0]], plan, 32**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_cached_decoding_on_gpu_matches_full_recompute(tok, images):
    torch.manual_seed(0)
    m = UniGenDet(get_config("tiny")).float().eval().cuda()
    packing = PackingConfig.tiny()
    det = Detector(m, tok, packing)
    prefill = det.build_prefill(images, [det.question] * 2)
    res = decode_answers(m, prefill, start_token_id=tok.im_start_id, eos_token_id=tok.im_end_id,
                         max_new_tokens=4, return_logits=True)
    for i, img in enumerate(images):
        plan, x = detection_plan(img, det._question_ids(det.question), packing, answer_ids=res["tokens"][i])
        full = build_packed_batch([plan], [x], tok, packing).to("cuda")
        with torch.no_grad():
            st = m.run(full)
            ce = m.language_model.lm_head(st["und"][full.ce_indexes]).cpu()
        n = min(len(res["tokens"][i]) + res["finished"][i], 4)
        torch.testing.assert_close(res["step_logits"][i, :n], ce[:n], rtol=1e-3, atol=1e-4)


def test_without_generative_tokens_matches_full_recompute(model, tok, images):
    packing = PackingConfig.tiny(det_use_vae=False)  # the demo's use_vae=False path: [ViT] [question] [answer]
    det = Detector(model, tok, packing)
    assert not det.use_vae
    prefill = det.build_prefill(images[:1], [det.question])
    assert prefill.num_und == prefill.seq_len  # no generation-expert token at all
    res = decode_answers(model, prefill, start_token_id=tok.im_start_id, eos_token_id=tok.im_end_id,
                         max_new_tokens=3, return_logits=True)
    plan, x = detection_plan(images[0], det._question_ids(det.question), packing, use_vae=False,
                             answer_ids=res["tokens"][0])
    full = build_packed_batch([plan], [x], tok, packing)
    with torch.no_grad():
        st = model.run(full)
        ce = model.language_model.lm_head(st["und"][full.ce_indexes])
    n = min(len(res["tokens"][0]) + res["finished"][0], 3)  # at least step 0 is compared
    torch.testing.assert_close(res["step_logits"][0, :n], ce[:n], rtol=1e-4, atol=1e-5)
