"""Training configuration parsing and pickle-free, atomic, exactly resumable checkpoints."""

import json
import os
import random

import numpy as np
import pytest
import torch

from unigendet.train.config import load_config
from unigendet.train.state import CheckpointManager, load_sharded, save_sharded


def _trained_linear(steps=3):
    m = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(steps):
        m(torch.randn(4, 5)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return m, opt


def test_overrides_and_presets(tmp_path):
    cfg = load_config("tiny", ["--lr=3e-4", "--gduf.steps=7", "--betas=0.9,0.99", "--ema=0.5",
                               "--data.backend=dali", "--diga.diga_layer=2", "--grad-checkpointing=true"])
    assert cfg.optim.lr == 3e-4 and cfg.gduf.steps == 7 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.ema == 0.5 and cfg.data.backend == "dali" and cfg.diga.diga_layer == 2
    assert cfg.grad_checkpointing is True
    big = load_config("bagel-7b-mot")
    assert big.gduf.steps == 1000 and big.diga.steps == 500 and big.diga.w_diga == 0.5
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "tiny", "optim": {"lr": 0.01}, "gduf": {"steps": 3}}))
    cfg = load_config(str(path), ["--gduf.steps=4"])
    assert cfg.optim.lr == 0.01 and cfg.gduf.steps == 4
    ypath = tmp_path / "c.yaml"
    ypath.write_text("preset: tiny\nstage: gduf\noptim:\n  betas: [0.8, 0.9]\n")
    cfg = load_config(str(ypath))
    assert cfg.stage == "gduf" and cfg.optim.betas == (0.8, 0.9)


@pytest.mark.parametrize("bad, match", [
    (["--steps=3"], "ambiguous"),
    (["--nope=1"], "unknown option"),
    (["--lr=fast"], "expects float"),
    (["--stage=three"], "stage must be"),
    (["lr=1"], "--key=value"),
    (["--grad_checkpointing=maybe"], "boolean"),
])
def test_bad_overrides(bad, match):
    with pytest.raises(ValueError, match=match):
        load_config("tiny", bad)


def test_unknown_preset():
    with pytest.raises(ValueError, match="neither a preset"):
        load_config("huge")


def test_sharded_roundtrip_bit_exact(tmp_path):
    sd = {f"w{i}": torch.randn(64, 33, dtype=dt) for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16])}
    sd["tied"] = sd["w0"]  # shared storage is written as a copy
    names = save_sharded(sd, str(tmp_path), max_shard_bytes=64 * 33 * 4)
    assert len(names) > 1
    back = load_sharded(str(tmp_path))
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k])


def test_checkpoint_resume_is_exact(tmp_path):
    m, opt = _trained_linear()
    cm = CheckpointManager(str(tmp_path), keep_last=2)
    for step in (1, 2, 3):
        cm.save(step=step, model_state=m.state_dict(), optimizer=opt, trainer_state={"data": {"pos": step}},
                ema_state={k: v * 0.5 for k, v in m.state_dict().items()})
    assert cm.list() == ["step_0000002", "step_0000003"]
    assert cm.latest().endswith("step_0000003")
    expected = (torch.rand(4), float(np.random.rand()), random.random())

    m2 = torch.nn.Linear(5, 3)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, betas=(0.9, 0.95))
    state = CheckpointManager.load(cm.latest(), opt2)
    got = (torch.rand(4), float(np.random.rand()), random.random())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]
    m2.load_state_dict(state["model_state"])
    assert state["trainer_state"]["data"] == {"pos": 3}
    assert torch.equal(state["ema_state"]["weight"], m.weight.detach() * 0.5)
    # one more identical step on both gives identical weights
    x = torch.randn(4, 5)
    for mod, o in ((m, opt), (m2, opt2)):
        mod(x).pow(2).mean().backward()
        o.step()
    assert torch.equal(m.weight, m2.weight) and torch.equal(m.bias, m2.bias)


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    m, opt = _trained_linear()
    cm = CheckpointManager(str(tmp_path), keep_last=3)
    cm.save(step=1, model_state=m.state_dict(), optimizer=opt, trainer_state={})
    import unigendet.train.state as st

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "get_rng_state", boom)
    with pytest.raises(KeyboardInterrupt):
        cm.save(step=2, model_state=m.state_dict(), optimizer=opt, trainer_state={})
    assert cm.list() == ["step_0000001"]
    assert not [n for n in os.listdir(cm.root) if n.startswith(".tmp-")]
    assert cm.latest().endswith("step_0000001")
