"""The SMSA visibility rule (unigendet.pack.visibility) and the layouts built from it."""

import pytest
import torch

from unigendet.models import get_config, smsa_layout
from unigendet.models.synthetic import DetSpec, GenSpec, make_batch
from unigendet.ops import AttentionLayout
from unigendet.pack import SMSA_MODES, answer_visible_splits, visible_splits

# A detection sample: [VAE clean] [ViT] [question] [answer]; a generation sample: [caption] [VAE noisy].
DET_MODES, DET_KINDS = ["full", "full", "causal", "causal"], ["gen", "vit", "text", "answer"]
GEN_MODES, GEN_KINDS = ["causal", "noise"], ["text", "gen"]


def test_reference_is_bagels_prefix_rule():
    assert visible_splits(DET_MODES, DET_KINDS, detection=True, smsa="reference") == [[], [0], [0, 1], [0, 1, 2]]
    # a noisy split is hidden from what follows it
    assert visible_splits(["noise", "causal"], ["gen", "text"], detection=False, smsa="reference") == [[], []]


def test_paper_lets_the_vit_tokens_read_the_instruction_only():
    vis = visible_splits(DET_MODES, DET_KINDS, detection=True, smsa="paper")
    assert vis == [[], [0, 2], [0, 1], [0, 1, 2]]  # ViT sees the question, never the answer
    # two question splits before the answer: the ViT split sees both
    vis = visible_splits(DET_MODES[:3] + ["causal", "causal"], DET_KINDS[:3] + ["text", "answer"], detection=True,
                         smsa="paper")
    assert vis[1] == [0, 2, 3]


def test_off_hides_the_generative_latents_from_the_detection_sample():
    vis = visible_splits(DET_MODES, DET_KINDS, detection=True, smsa="off")
    assert vis == [[], [], [1], [1, 2]]


@pytest.mark.parametrize("smsa", SMSA_MODES)
def test_generation_samples_keep_bagels_rule(smsa):
    ref = visible_splits(GEN_MODES, GEN_KINDS, detection=False, smsa="reference")
    assert visible_splits(GEN_MODES, GEN_KINDS, detection=False, smsa=smsa) == ref


@pytest.mark.parametrize("smsa", SMSA_MODES)
def test_the_decoded_answer_sees_what_a_packed_answer_sees(smsa):
    full = visible_splits(DET_MODES, DET_KINDS, detection=True, smsa=smsa)
    assert answer_visible_splits(DET_MODES[:3], DET_KINDS[:3], detection=True, smsa=smsa) == full[3]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="smsa"):
        visible_splits(DET_MODES, DET_KINDS, detection=True, smsa="paper2")
    with pytest.raises(ValueError, match="same length"):
        visible_splits(DET_MODES, DET_KINDS[:2], detection=True, smsa="paper")
    with pytest.raises(ValueError, match="kinds"):
        visible_splits(["full"], ["image"], detection=True, smsa="paper")


def test_from_splits_takes_the_rule_and_checks_it():
    samples = [[(3, "full"), (2, "causal")], [(2, "causal")]]
    default = AttentionLayout.from_splits(samples)
    explicit = AttentionLayout.from_splits(samples, visible=[[[], [0]], [[]]])
    assert torch.equal(default.dense_mask(), explicit.dense_mask())
    # the first split also sees the second (as the paper rule lets ViT tokens see later text)
    wider = AttentionLayout.from_splits(samples, visible=[[[1], [0]], [[]]]).dense_mask()
    assert wider[0, 3] and wider[0, 4] and not default.dense_mask()[0, 3]
    assert not wider[0, 5]  # samples stay apart
    with pytest.raises(ValueError, match="one list per split"):
        AttentionLayout.from_splits(samples, visible=[[[], [0]]])
    with pytest.raises(ValueError, match=r"visible\[0\]\[1\]"):
        AttentionLayout.from_splits(samples, visible=[[[], [1]], [[]]])  # itself: its mode decides
    with pytest.raises(ValueError, match=r"visible\[1\]\[0\]"):
        AttentionLayout.from_splits(samples, visible=[[[], [0]], [[1]]])  # no such split in sample 1


def test_every_packer_records_the_kinds_the_rule_reads():
    cfg = get_config("tiny")
    b = make_batch(cfg, [DetSpec(vae_grid=(2, 2), vit_grid=(2, 2), question_len=3, answer_len=2),
                         GenSpec(vae_grid=(2, 2), caption_len=3)], seed=0, diga=True)
    assert b.split_kinds == [DET_KINDS, GEN_KINDS]
    assert b.diga.split_kinds == [["gen", "text", "vit"]]
    b.split_kinds = []
    with pytest.raises(ValueError, match="split_kinds"):
        smsa_layout(b, "paper")


def test_the_data_packer_records_kinds_for_training_and_decoding_packs():
    import numpy as np
    from PIL import Image

    from unigendet.data import PackingConfig
    from unigendet.data.packing import build_packed_batch
    from unigendet.inference import detection_plan
    from unigendet.tokenizer import load_tokenizer

    tok, packing = load_tokenizer("tiny"), PackingConfig.tiny()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    q = tok.encode("Is this image real or fake?")
    prefill = build_packed_batch(*map(lambda x: [x], detection_plan(img, q, packing)), tok, packing)
    train = build_packed_batch(*map(lambda x: [x], detection_plan(img, q, packing, answer_ids=[5, 6])), tok, packing)
    assert prefill.split_kinds == [DET_KINDS[:3]]
    assert train.split_kinds == [DET_KINDS]


def test_a_pack_carries_one_layout_and_the_model_uses_it(monkeypatch):
    import numpy as np
    from PIL import Image

    import unigendet.models.smsa as smsa_mod
    from unigendet.data import PackingConfig
    from unigendet.data.packing import build_packed_batch
    from unigendet.inference import detection_plan
    from unigendet.models import UniGenDet
    from unigendet.tokenizer import load_tokenizer

    tok = load_tokenizer("tiny")
    packing = PackingConfig.tiny(smsa="paper")
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    plan, x = detection_plan(img, tok.encode("Real or fake?"), packing, answer_ids=[5, 6, 7])
    batch = build_packed_batch([plan], [x], tok, packing)
    assert batch.smsa == "paper"
    rebuilt = smsa_mod.build_layout(batch, "paper")
    assert torch.equal(batch.layout.dense_mask(), rebuilt.dense_mask())
    assert not torch.equal(batch.layout.dense_mask(), smsa_mod.build_layout(batch, "reference").dense_mask())

    built = []
    real_build = smsa_mod.build_layout
    monkeypatch.setattr(smsa_mod, "build_layout", lambda b, m, device=None: built.append(m) or real_build(b, m, device))
    torch.manual_seed(0)
    model = UniGenDet(get_config("tiny", smsa_mode="paper")).float()
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(0))
        assert built == []  # the pack's own layout: no host work in the step
        model.config.smsa_mode = "off"
        model(batch, generator=torch.Generator().manual_seed(0))
        assert built == ["off"]  # another mode than the pack's: built for this call
    assert torch.isfinite(out["det_logits"]).all()
