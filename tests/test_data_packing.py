"""Packing: split rules, RoPE ids, CE/detection indexes, expert-contiguous order, layout, budgets and mix."""

import math

import numpy as np
import pytest
import torch

from unigendet.data.packing import (
    ImageItem,
    PackingConfig,
    SamplePlan,
    TextItem,
    build_diga_batch,
    build_packed_batch,
    iter_packs,
    plan_detection,
    plan_generation,
    weighted_interleave,
)
from unigendet.data.readers import DetectionRecord, GenerationRecord
from unigendet.data.transforms import patchify

CFG = PackingConfig.tiny(diga=True)


def _det(i, size, label):
    rec = DetectionRecord(f"d{i}", f"/x/d{i}.png", label, "photo", "<image>Does the image looks real/fake?",
                          "This is a fake image. Checkerboard." if label == 0 else "This is a real image.")
    return rec, size


def _images(plan, cfg, gen):
    w, h = plan.size
    out = {}
    vw, vh = cfg.vit.size_for(w, h)
    aw, ah = cfg.vae.size_for(w, h)
    out["vit"] = torch.rand(3, vh, vw, generator=gen) * 2 - 1
    out["vae"] = torch.rand(3, ah, aw, generator=gen) * 2 - 1
    return out


def _make_pack(tok, cfg=CFG, n_det=3, n_gen=2, dropout=0.0):
    cfg = PackingConfig.tiny(diga=cfg.diga, text_cond_dropout_prob=dropout)
    plans = []
    sizes = [(64, 64), (80, 64), (64, 80), (48, 64)]
    for i in range(max(n_det, n_gen)):
        if i < n_gen:
            rec = GenerationRecord(f"g{i}", f"/x/g{i}.png", "a photo of a tabby cat")
            plans.append(plan_generation(rec, tok, cfg, sizes[i % 4], np.random.default_rng(i)))
        if i < n_det:
            rec, size = _det(i, sizes[(i + 1) % 4], i % 2)
            plans.append(plan_detection(rec, tok, cfg, size))
    g = torch.Generator().manual_seed(0)
    images = [_images(p, cfg, g) for p in plans]
    return plans, images, build_packed_batch(plans, images, tok, cfg), cfg


def _reference_mask(splits):
    """BAGEL's mask in BAGEL order, computed directly from the rules."""
    total = sum(n for s in splits for n, _ in s)
    m = torch.zeros(total, total, dtype=torch.bool)
    pos = 0
    for sample in splits:
        bounds = []
        for n, mode in sample:
            bounds.append((pos, pos + n, mode))
            pos += n
        for j, (a, b, mode) in enumerate(bounds):
            for q in range(a, b):
                for i in range(j):
                    a2, b2, m2 = bounds[i]
                    if m2 != "noise":
                        m[q, a2:b2] = True
                if mode == "causal":
                    m[q, a : q + 1] = True
                else:
                    m[q, a:b] = True
    return m


def test_splits_and_rope(tok):
    plans, images, b, cfg = _make_pack(tok)
    assert b.sample_kind == ["gen", "det", "gen", "det", "det"]
    # generation: [caption causal][vae noisy]; detection: [vae full][vit full][question causal][answer causal]
    assert [m for _, m in b.splits[0]] == ["causal", "noise"]
    assert [m for _, m in b.splits[1]] == ["full", "full", "causal", "causal"]
    assert b.sample_lens == [sum(n for n, _ in s) for s in b.splits] and sum(b.sample_lens) == b.seq_len
    assert b.sample_lens == [p.num_tokens for p in plans]
    # RoPE ids in BAGEL order
    pos_old = torch.empty_like(b.position_ids)
    pos_old[b.order] = b.position_ids
    start = b.sample_lens[0]
    (nv, _), (nt, _), (nq, _), (na, _) = b.splits[1]
    det = pos_old[start : start + b.sample_lens[1]].tolist()
    assert det[:nv] == [0] * nv and det[nv : nv + nt] == [1] * nt
    assert det[nv + nt :] == list(range(2, 2 + nq + na))
    (nc, _), (nn, _) = b.splits[0]
    gen = pos_old[: b.sample_lens[0]].tolist()
    assert gen[:nc] == list(range(nc)) and gen[nc:] == [nc] * nn  # noisy image: shared id, no advance


def test_indexes_and_expert_order(tok):
    plans, images, b, cfg = _make_pack(tok)
    S = b.seq_len
    # every position is exactly one of text / vit / vae
    allpos = torch.cat([b.text_indexes, b.vit_indexes, b.vae_indexes]).sort().values
    assert torch.equal(allpos, torch.arange(S))
    # expert-contiguous: und block first, gen block (VAE latents) after, each in BAGEL order
    assert torch.equal(b.vae_indexes, torch.arange(b.num_und, S))
    assert int(torch.cat([b.text_indexes, b.vit_indexes]).max()) < b.num_und
    assert torch.all(b.order[: b.num_und].diff() > 0) and torch.all(b.order[b.num_und :].diff() > 0)
    tokens = torch.full((S,), -1, dtype=torch.int64)
    tokens[b.text_indexes] = b.text_ids
    # detection head at the answer's <|im_start|>; labels from the records
    assert torch.all(tokens[b.det_indexes] == tok.im_start_id)
    assert b.det_labels.tolist() == [p.label for p in plans if p.kind == "det"]
    # CE: label = the next token in BAGEL order; the last CE label of an answer is <|im_end|>
    inv = torch.empty_like(b.order)
    inv[b.order] = torch.arange(S)
    nxt = inv[b.order[b.ce_indexes] + 1]
    assert torch.equal(tokens[nxt], b.ce_labels)
    n_answers = sum(1 for p in plans for it in p.items if isinstance(it, TextItem) and it.loss)
    assert int((b.ce_labels == tok.im_end_id).sum()) == n_answers
    ans_len = [len(it.ids) + 1 for p in plans for it in p.items if isinstance(it, TextItem) and it.loss]
    assert b.ce_indexes.numel() == sum(ans_len)
    # ViT / VAE markers around image tokens
    old_tokens = tokens[inv]
    for idx in (b.vit_indexes, b.vae_indexes):
        first = b.order[idx]
        assert old_tokens[(first - 1)[~torch.isin(first - 1, first)]].eq(tok.vision_start_id).all()
        assert old_tokens[(first + 1)[~torch.isin(first + 1, first)]].eq(tok.vision_end_id).all()


def test_image_fields(tok):
    plans, images, b, cfg = _make_pack(tok)
    vits = [im["vit"] for p, im in zip(plans, images) if p.kind == "det"]
    assert torch.equal(b.vit_patches, torch.cat([patchify(v, 14) for v in vits]))
    assert b.vit_grids == [(v.shape[1] // 14, v.shape[2] // 14) for v in vits]
    assert b.vit_cu_seqlens.dtype == torch.int32
    assert b.vit_cu_seqlens.tolist() == [0, *np.cumsum([h * w for h, w in b.vit_grids]).tolist()]
    assert b.vit_max_seqlen == max(h * w for h, w in b.vit_grids)
    h, w = b.vit_grids[0]
    assert b.vit_position_ids[: h * w].tolist() == [r * 4 + c for r in range(h) for c in range(w)]
    assert [tuple(v.shape[1:]) for v in b.vae_images] == [(gh * 16, gw * 16) for gh, gw in b.vae_latent_grids]
    kinds = [("gen" if p.kind == "gen" else "det") for p in plans]
    assert torch.isfinite(b.vae_noise_logit).tolist() == [k == "gen" for k in kinds]
    noisy_imgs = torch.nonzero(torch.isfinite(b.vae_noise_logit)).flatten()
    assert torch.equal(b.mse_indexes, b.vae_indexes[torch.isin(b.vae_image_of_token, noisy_imgs)])
    assert b.vae_image_of_token.tolist() == [i for i, (gh, gw) in enumerate(b.vae_latent_grids) for _ in range(gh * gw)]
    assert all(t.dtype == torch.int64 for t in (b.order, b.position_ids, b.text_indexes, b.ce_indexes,
                                                b.det_indexes, b.vit_indexes, b.vae_indexes, b.mse_indexes))


def test_layout_matches_bagel_mask(tok):
    plans, images, b, cfg = _make_pack(tok)
    ref = _reference_mask(b.splits)
    permuted = ref[b.order][:, b.order]
    assert torch.equal(b.layout.dense_mask(), permuted)
    # spot-check the detection rules: VAE tokens never see ViT/text, ViT sees VAE, text sees both
    assert b.layout.plan.total_q == b.seq_len


@pytest.mark.parametrize("dropout,use_vae", [(1.0, True), (0.0, False)])
def test_layout_variants(tok, dropout, use_vae):
    """Caption dropped (a lone noise split) and detection without the generative latent."""
    cfg = PackingConfig.tiny(text_cond_dropout_prob=dropout, det_use_vae=use_vae)
    rec = GenerationRecord("g", "/x/g.png", "a photo")
    plans = [plan_generation(rec, tok, cfg, (64, 64), np.random.default_rng(0)),
             plan_detection(_det(0, (64, 48), 1)[0], tok, cfg, (64, 48))]
    g = torch.Generator().manual_seed(0)
    images = [_images(p, cfg, g) for p in plans]
    b = build_packed_batch(plans, images, tok, cfg)
    gen_modes = [m for _, m in b.splits[0]]
    assert gen_modes == (["noise"] if dropout == 1.0 else ["causal", "noise"])
    assert [m for _, m in b.splits[1]] == (["full"] if not use_vae else ["full", "full"]) + ["causal", "causal"]
    assert len(b.vae_images) == 1 + int(use_vae)
    assert torch.equal(b.layout.dense_mask(), _reference_mask(b.splits)[b.order][:, b.order])


def test_diga_teacher(tok):
    plans, images, b, cfg = _make_pack(tok)
    t = build_diga_batch(plans, images, b, tok, cfg)
    assert t is not None and t.sample_kind == ["diga", "diga"]
    for s in t.splits:
        assert [m for _, m in s] == ["full", "causal", "full"]
    noisy = torch.nonzero(torch.isfinite(b.vae_noise_logit)).flatten()
    assert torch.equal(t.student_image_ids, noisy)
    assert t.student_grids == [b.vae_latent_grids[i] for i in noisy.tolist()]
    assert t.teacher_grids == t.vit_grids and torch.equal(t.teacher_vit_indexes, t.vit_indexes)
    for i, j in enumerate(t.student_image_ids.tolist()):
        assert torch.equal(t.vae_images[i], b.vae_images[j])
    assert torch.isinf(t.vae_noise_logit).all() and t.mse_indexes.numel() == 0 and t.ce_indexes.numel() == 0
    assert torch.equal(t.layout.dense_mask(), _reference_mask(t.splits)[t.order][:, t.order])
    text = tok.decode(t.text_ids.tolist())
    assert "forensic image analyst" in text and "a photo of a tabby cat" in text


def test_cfg_dropout(tok):
    rec = GenerationRecord("g", "/x/g.png", "a photo of a cat")
    def n_text(p):
        return sum(isinstance(it, TextItem) for it in p.items)

    for prob, expect in ((0.0, 1), (1.0, 0)):
        cfg = PackingConfig.tiny(text_cond_dropout_prob=prob)
        assert n_text(plan_generation(rec, tok, cfg, (64, 64), np.random.default_rng(0))) == expect
    cfg = PackingConfig.tiny(text_cond_dropout_prob=0.5)
    kept = sum(n_text(plan_generation(rec, tok, cfg, (64, 64), np.random.default_rng(i))) for i in range(400))
    assert 150 < kept < 250


def _fake_plan(i, n_tokens, kind="det"):
    return SamplePlan(kind, f"s{i}", "", (1, 1), [TextItem([7] * (n_tokens - 2))])


@pytest.mark.parametrize("expected,maximum,per_sample", [(512, 640, 512), (250, 300, 200), (1000, 1200, 1100)])
def test_budgets(expected, maximum, per_sample):
    rng = np.random.default_rng(0)
    sizes = rng.integers(5, 400, size=300).tolist()
    cfg = PackingConfig.tiny(expected_num_tokens=expected, max_num_tokens=maximum, max_num_tokens_per_sample=per_sample)
    skipped = {}
    packs = list(iter_packs((_fake_plan(i, n) for i, n in enumerate(sizes)), cfg, skipped))
    ids = [s.id for p in packs for s in p]
    accepted = [f"s{i}" for i, n in enumerate(sizes) if n <= per_sample]
    assert sorted(ids) == sorted(accepted) and len(ids) == len(set(ids))  # each accepted sample exactly once
    assert skipped.get("too_many_tokens", 0) == len(sizes) - len(accepted)
    totals = [sum(s.num_tokens for s in p) for p in packs]
    assert max(totals) <= maximum
    # packs reach the expected size until the end of the stream flushes the buffer (at most max_buffer
    # samples plus one partial pack)
    first_short = next((i for i, t in enumerate(totals) if t < expected), len(totals))
    assert sum(len(p) for p in packs[first_short:]) <= cfg.max_buffer + maximum // 5
    assert first_short >= len(packs) // 2


@pytest.mark.parametrize("wg,wd", [(1, 1), (1, 5), (2, 3), (0, 1)])
def test_mix_ratio(wg, wd):
    streams = {"gen": iter(range(10_000)), "det": iter(range(10_000))}
    got = [k for k, _ in zip(weighted_interleave(streams, {"gen": wg, "det": wd}), range(600))]
    n = len(got) // (wg + wd) * (wg + wd)
    assert got[:n].count("gen") * wd == got[:n].count("det") * wg
    # smooth: never more than the weight in a row for the minority stream's opponent
    if wg and wd:
        run, longest = 0, 0
        for a, b in zip(got, got[1:]):
            run = run + 1 if a == b == "det" else 0
            longest = max(longest, run)
        assert longest < math.ceil(wd / wg) + 1


def test_mix_ratio_exhausted_stream_dropped():
    got = list(weighted_interleave({"gen": iter(range(3)), "det": iter(range(10))}, {"gen": 1, "det": 1}))
    assert [k for k, _ in got].count("gen") == 3 and len(got) == 13


def test_config_validation():
    with pytest.raises(ValueError, match="max_num_tokens_per_sample"):
        PackingConfig.tiny(max_num_tokens_per_sample=10_000)
    with pytest.raises(ValueError, match="weight"):
        PackingConfig.tiny(gen_weight=0, det_weight=0)
    with pytest.raises(ValueError, match="vit_max_patches_per_side"):
        PackingConfig.tiny(vit_max_patches_per_side=2)
    # ImageItem grid / token count
    assert ImageItem("vae", (3, 4)).num_tokens == 14
