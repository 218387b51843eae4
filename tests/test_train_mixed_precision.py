"""Mixed precision: bf16 compute over fp32 master weights and optimizer state (on the CPU here).

The same rule runs on GPUs (autocast for one process and DDP; FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`` over fp32 sharded parameters): the optimizer only ever updates fp32 tensors, so an update far
below bf16's resolution still moves the weights, and checkpoints hold the fp32 masters.
"""

import os
import subprocess
import sys

import torch

from unigendet.train.config import load_config
from unigendet.train.loop import Trainer
from unigendet.train.state import load_sharded

# A learning rate whose AdamW updates (about lr per step) are far below bf16's spacing of 2^-7 at 1.0.
LR = 1e-6
BASE = [f"--lr={LR}", "--optim.warmup_steps=0", "--data.expected_tokens=512", "--data.max_tokens=640",
        "--data.max_tokens_per_sample=512", "--log_every=1", "--grad_accum=1", "--ema=0", "--eval_samples=0",
        "--sample_images=0", "--gen_eval_samples=0", "--dtype=bf16", "--seed=7", "--optim.schedule=constant"]


def _norm_weights(state: dict) -> dict:
    """The RMSNorm weights (initialised to exactly 1.0)."""
    return {k: v for k, v in state.items() if k.endswith("norm.weight") or "norm_moe_gen.weight" in k}


def test_bf16_weights_would_lose_the_update():
    """The premise: AdamW at this learning rate cannot move a bf16 weight of 1.0."""
    w = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = torch.optim.AdamW([w], lr=LR, weight_decay=0.0)
    w.grad = torch.randn(64).to(torch.bfloat16)
    opt.step()
    assert torch.equal(w.detach(), torch.ones(64, dtype=torch.bfloat16))


def test_bf16_compute_updates_fp32_masters_and_checkpoints_keep_them(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "unigendet.train", *BASE, "--no-progress", f"--out-dir={out}",
                          "--stage=all", "--gduf.steps=2", "--diga.steps=1"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    state = load_sharded(str(out / "checkpoints" / "step_0000002"))
    assert {v.dtype for v in state.values()} == {torch.float32}
    norms = _norm_weights(state)
    assert len(norms) >= 8
    for k, v in norms.items():
        moved = (v - 1.0).abs().max().item()
        assert 0 < moved < 1e-4, (k, moved)  # moved by about lr per step ...
        assert torch.equal(v.to(torch.bfloat16), torch.ones_like(v, dtype=torch.bfloat16)), k  # ... invisible in bf16
    final = load_sharded(str(out / "final"), "model")
    assert {v.dtype for v in final.values()} == {torch.float32}


def test_bf16_compute_resumes_bit_exactly(tmp_path):
    """A run stopped after step 1 (a shortened run: with a constant learning rate its checkpoint is the one a signal
    would write) and resumed equals the uninterrupted run bit for bit."""

    def trainer(out, *extra):
        return Trainer(load_config("tiny", [*BASE, f"--out_dir={out}", "--save_every=1000", *extra]), progress=False)

    ref = trainer(tmp_path / "ref", "--stage=gduf", "--gduf.steps=3")
    assert ref.amp_dtype == torch.bfloat16
    ref.run()
    out = tmp_path / "interrupted"
    trainer(out, "--stage=gduf", "--gduf.steps=1").run()
    resumed = trainer(out, "--stage=gduf", "--gduf.steps=3", "--resume=true", "--allow_config_change=true")
    resumed.run()
    a, b = resumed.model.state_dict(), ref.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float32 or not a[k].is_floating_point(), k
        assert torch.equal(a[k], b[k]), k


def test_memory_estimate_counts_fp32_states_per_rank():
    from unigendet.models import UniGenDet, get_config
    from unigendet.train.memory import estimate_training_memory

    with torch.device("meta"):
        model = UniGenDet(get_config("tiny"), build_vae_module=False)
    total = sum(p.numel() for p in model.parameters())
    one, four = (estimate_training_memory("tiny", world_size=w, tokens_per_gpu=256) for w in (1, 4))
    assert one.total_params == total and one.master_weights == 4 * total
    assert four.master_weights == 4 * total // 4 and four.optimizer_state == 2 * four.gradients
    diga = estimate_training_memory("tiny", world_size=4, stage="diga", tokens_per_gpu=256)
    assert diga.trainable_params < one.trainable_params and diga.diga_teacher > 0
    assert one.total == one.states + one.activations_estimate
