"""The training loop end to end on the CPU: data parallelism, exact resumption, signals, DIGA freezing,
non-finite losses, the command line and the end-of-run outputs (tiny model, a few steps each)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from unigendet.train.config import load_config
from unigendet.train.logs import read_jsonl
from unigendet.train.loop import Trainer, TrainingAborted, _optimizer_state
from unigendet.train.state import CheckpointManager, load_sharded

# Every run: the tiny model with small packs and a fine-tuning learning rate (pinned here so that tuning the
# tiny preset changes neither the cost nor the numerical tolerances of these tests).
BASE = ["--lr=1e-4", "--optim.warmup_steps=0", "--data.expected_tokens=512", "--data.max_tokens=640",
        "--data.max_tokens_per_sample=512", "--data.det_ratio=1", "--data.gen_ratio=1", "--log_every=1",
        "--grad_accum=1", "--ema=0"]
# ... and no end-of-run evaluation or samples unless a test is about them.
QUIET = [*BASE, "--eval_samples=0", "--sample_images=0", "--gen_eval_samples=0"]


def _env(**extra):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _cli(out, *args):
    return [sys.executable, "-m", "unigendet.train", *QUIET, "--no-progress", f"--out-dir={out}", *args]


def _run(cmd, timeout=240):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _trainer(out, *overrides) -> Trainer:
    cfg = load_config("tiny", [*QUIET, f"--out_dir={out}", *overrides])
    return Trainer(cfg, progress=False)


def _steps(out) -> list[dict]:
    return [r for r in read_jsonl(os.path.join(out, "train.jsonl")) if r["event"] == "step"]


def _logged_steps(out) -> int:
    """Step records so far in a running job's log (read as text: the last line may be half written)."""
    try:
        return (out / "train.jsonl").read_text().count('"event": "step"')
    except FileNotFoundError:
        return 0


def _loss_log(out) -> list[tuple]:
    """(round, stage, step, lr, grad_norm, losses...) of every logged step, in order."""
    keys = ("round", "stage", "step", "global_step", "lr", "grad_norm", "tokens", "skipped")
    return [tuple(r[k] for k in keys) + tuple(sorted((k, v) for k, v in r.items() if k.startswith("loss")))
            for r in _steps(out)]


# ---------------------------------------------------------------------------------------------- data parallel


def test_two_process_gloo_matches_one_process_grad_accum(tmp_path):
    """W=2 processes x grad_accum 1 == 1 process x grad_accum 2: same packs, same noise, same gradients."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    common = ["--stage=gduf", "--gduf.steps=2", "--seed=3"]
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
          "-m", "unigendet.train", *QUIET, "--no-progress", f"--out-dir={ddp}", *common,
          "--grad_accum=1", "--parallel=ddp"])
    _run(_cli(single, *common, "--grad_accum=2"))

    a, b = _steps(ddp), _steps(single)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        # rank 0 logs the global mean losses and the global token count
        assert ra["tokens"] == rb["tokens"]
        for k in ("loss", "loss_ce", "loss_mse", "loss_label"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), k
    wa = load_sharded(str(ddp / "checkpoints" / "step_0000002"))
    wb = load_sharded(str(single / "checkpoints" / "step_0000002"))
    assert wa.keys() == wb.keys()
    init = _trainer(tmp_path / "init", *common).model.state_dict()
    moved = 0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=k)
        moved += not torch.equal(wa[k], init[k])
    assert moved > 0.5 * len(wa), "training did not update the weights"
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["throughput"]["world_size"] == 2


def test_fsdp_two_processes_match_one_process_and_resume_exactly(tmp_path):
    """FSDP2 (fully_shard per block, on gloo): both stages equal one process with the same global batch; the
    gathered checkpoints resume bit for bit (weights, optimizer, EMA, DIGA teacher rebuilt from its snapshot);
    DIGA leaves every frozen weight of the GDUF model untouched."""
    common = ["--seed=5", "--ema=0.5", "--optim.warmup_steps=3", "--save_every=1000", "--stage=all"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "unigendet.train", *QUIET, "--no-progress", "--parallel=fsdp", "--grad_accum=1", *common]
    ref, single, out = tmp_path / "fsdp", tmp_path / "single", tmp_path / "interrupted"
    _run([*torchrun, f"--out-dir={ref}", "--gduf.steps=2", "--diga.steps=2"])
    _run(_cli(single, *common, "--grad_accum=2", "--gduf.steps=2", "--diga.steps=2"))
    a, b = _steps(ref), _steps(single)
    assert [(r["stage"], r["step"]) for r in a] == [("gduf", 1), ("gduf", 2), ("diga", 1), ("diga", 2)]
    for ra, rb in zip(a, b, strict=True):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
    wa, wb = load_sharded(str(ref / "final"), "model"), load_sharded(str(single / "final"), "model")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=k)
    snap = load_sharded(str(ref / "round1" / "gduf_model"))
    trainable = set(_trainer(tmp_path / "names").model.configure_stage("diga"))
    assert all(torch.equal(wa[k], snap[k]) for k in snap if k not in trainable)
    assert any(not torch.equal(wa[k], snap[k]) for k in snap if k in trainable)

    _run([*torchrun, f"--out-dir={out}", "--stage=gduf", "--gduf.steps=1"])
    _run([*torchrun, f"--out-dir={out}", "--gduf.steps=2", "--diga.steps=1", "--resume", "--allow-config-change"])
    _run([*torchrun, f"--out-dir={out}", "--gduf.steps=2", "--diga.steps=2", "--resume", "--allow-config-change"])
    assert _loss_log(out) == _loss_log(ref)
    wc = load_sharded(str(out / "final"), "model")
    assert all(torch.equal(wc[k], wa[k]) for k in wa)


# ---------------------------------------------------------------------------------------------- resumption


def test_resume_continues_exactly(tmp_path):
    """Stop in GDUF and in DIGA, resume each time: losses and weights equal one uninterrupted run bit for bit.

    Each stop is a stage run shortened with ``--*.steps`` whose last checkpoint is then continued with the full
    step count (a configuration change, hence ``allow_config_change``): the checkpoint is written exactly as on a
    signal (mid-stage, before the stage completes), so this exercises the data position, optimizer, scheduler,
    EMA, RNG and the DIGA teacher rebuilt from the GDUF snapshot.
    """
    common = ["--seed=5", "--ema=0.5", "--optim.warmup_steps=3", "--save_every=1000"]
    ref = tmp_path / "ref"
    full = _trainer(ref, *common, "--stage=all", "--gduf.steps=2", "--diga.steps=2")
    full.run()

    out = tmp_path / "interrupted"
    _trainer(out, *common, "--stage=gduf", "--gduf.steps=1").run()
    changed = ["--resume=true", "--allow_config_change=true"]
    t = _trainer(out, *common, "--stage=all", "--gduf.steps=2", "--diga.steps=1", *changed)
    t.run()
    assert t.history["r1-gduf"]["steps"] == 2
    last = _trainer(out, *common, "--stage=all", "--gduf.steps=2", "--diga.steps=2", *changed)
    last.run()

    events = [r["event"] for r in read_jsonl(os.path.join(out, "train.jsonl"))]
    assert events.count("resume") == 2
    got, want = _loss_log(out), _loss_log(ref)
    assert [(g[1], g[2]) for g in got] == [("gduf", 1), ("gduf", 2), ("diga", 1), ("diga", 2)]
    assert got == want
    sa, sb = last.model.state_dict(), full.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    fa, fb = load_sharded(str(out / "final"), "model"), load_sharded(str(ref / "final"), "model")
    assert all(torch.equal(fa[k], fb[k]) for k in fb)


def test_sigterm_saves_a_loadable_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    cmd = _cli(out, "--stage=gduf", "--gduf.steps=500", "--save_every=1000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 180
        while _logged_steps(out) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no training steps were logged"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted by signal 15" in err

    folder = CheckpointManager(str(out)).latest()
    assert folder is not None and os.path.isdir(folder)
    loaded = CheckpointManager.load(folder, restore_rng=False)
    meta = loaded["trainer_state"]
    stopped = meta["stage_step"]
    assert meta["stage"] == "gduf" and stopped >= 2 and meta["next_pack"] == [stopped]
    assert stopped == len(_steps(out))  # the checkpoint is the state after the last logged step
    assert _optimizer_state(folder)["state"][0]["step"] == stopped
    t = _trainer(tmp_path / "fresh", "--stage=gduf")
    missing, unexpected = t.model.load_state_dict(loaded["model_state"], strict=False)
    assert not unexpected and all(k.startswith("vae.") for k in missing)
    assert not (out / "summary.json").exists()

    _run(_cli(out, "--stage=gduf", f"--gduf.steps={stopped + 1}", "--save_every=1000", "--resume",
              "--allow-config-change"))
    recs = read_jsonl(os.path.join(out, "train.jsonl"))
    after = recs[[r["event"] for r in recs].index("resume"):]
    assert after[0]["path"] == folder
    assert [r["step"] for r in after if r["event"] == "step"] == [stopped + 1]
    assert (out / "summary.json").exists()


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """A signal that reaches one rank only: every rank still saves and stops after the same step."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "unigendet.train", *QUIET, "--no-progress", f"--out-dir={out}", "--stage=gduf", "--gduf.steps=500",
           "--save_every=1000", "--parallel=ddp"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        deadline = time.monotonic() + 180
        while _logged_steps(out) < 2:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no training steps were logged"
            time.sleep(0.2)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            workers = [int(p) for p in f.read().split()]
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGTERM)
        logs, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert logs.count("signal 15 received") == 1, logs[-3000:]
    folder = CheckpointManager(str(out)).latest()
    meta = CheckpointManager.load(folder, restore_rng=False)["trainer_state"]
    stopped = meta["stage_step"]
    # both ranks stopped after step `stopped`: their next global packs are 2 * stopped and 2 * stopped + 1
    assert meta["world_size"] == 2 and meta["next_pack"] == [2 * stopped, 2 * stopped + 1]
    recs = read_jsonl(os.path.join(out, "train.jsonl"))
    assert [r["step"] for r in recs if r["event"] == "step"] == list(range(1, stopped + 1))
    assert recs[-1]["event"] == "interrupted" and recs[-1]["signal"] == signal.SIGTERM


# ---------------------------------------------------------------------------------------------- DIGA


def _grad_total(model, pred) -> float:
    grads = [p.grad for n, p in model.named_parameters() if pred(n) and p.grad is not None]
    return float(sum(g.abs().sum() for g in grads)) if grads else 0.0


def test_diga_trains_only_the_generator_and_the_alignment_term_reaches_it(tmp_path):
    t = _trainer(tmp_path, "--stage=diga", "--diga.steps=1", "--diga.w_flow=0", "--diga.w_diga=1",
                 "--optim.weight_decay=0.1", "--save_every=1000")
    model = t.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teachers = []
    make = t._diga_teacher
    t._diga_teacher = lambda *a, **k: teachers.append(make(*a, **k)) or teachers[-1]

    # Flow weight 0: only the DIGA term drives the step.
    t.run_stage(1, "diga")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.configure_stage("diga"))
    assert any("moe_gen" in n for n in trainable) and any(n.startswith("diga_mlp.") for n in trainable)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in after.items():
        if k not in trainable:
            assert torch.equal(v, before[k]), f"frozen {k} changed"
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, f"frozen {n} got a gradient"
    assert _grad_total(model, lambda n: n.startswith("diga_mlp.")) > 0
    assert _grad_total(model, lambda n: "moe_gen" in n) > 0
    assert _grad_total(model, lambda n: n.startswith("llm2vae.")) == 0  # the flow head only feeds the flow loss
    assert any(not torch.equal(v, before[k]) for k, v in after.items() if k.startswith("diga_mlp."))
    # The teacher is a frozen copy of the starting model and does not drift while the student trains.
    (teacher,) = teachers
    tsd = teacher.state_dict()
    assert len(tsd) > 0
    for k, v in tsd.items():
        assert torch.equal(v, before[k]), f"teacher {k} is not the starting model's"
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())

    # DIGA weight 0: the flow loss still trains the generator, diga_mlp gets no gradient at all.
    # (Two steps: llm2vae starts at zero, so the flow loss reaches the decoder only from the second step on.)
    t.cfg.diga.w_flow, t.cfg.diga.w_diga, t.cfg.diga.steps = 1.0, 0.0, 2
    t.run_stage(1, "diga")
    diga_grads = [p.grad for n, p in model.named_parameters() if n.startswith("diga_mlp.")]
    assert all(g is None or not g.any() for g in diga_grads)
    assert _grad_total(model, lambda n: "moe_gen" in n) > 0
    assert _grad_total(model, lambda n: n.startswith("llm2vae.")) > 0
    for k, v in model.state_dict().items():
        if k not in trainable:
            assert torch.equal(v, before[k]), f"frozen {k} changed"
    for k, v in teachers[-1].state_dict().items():  # the second stage's teacher: the model it started from
        assert torch.equal(v, after[k]), k


# ---------------------------------------------------------------------------------------------- non-finite losses


def _nan_on(monkeypatch, calls):
    """Make the loss NaN on the given 1-based calls of the stage loss (unigendet.train.step.stage_losses)."""
    import unigendet.train.loop as loop

    orig = loop.stage_losses
    seen = [0]

    def losses(out, stage, scfg):
        res = orig(out, stage, scfg)
        seen[0] += 1
        if calls is None or seen[0] in calls:
            res["loss"] = res["loss"] * float("nan")
        return res

    monkeypatch.setattr(loop, "stage_losses", losses)


def test_nonfinite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    _nan_on(monkeypatch, {2})
    t = _trainer(tmp_path, "--stage=gduf", "--gduf.steps=3", "--max_nonfinite=1", "--save_every=1000")
    summary = t.run()
    assert summary["nonfinite_steps"] == 1 and t.nonfinite == 1
    recs = read_jsonl(os.path.join(tmp_path, "train.jsonl"))
    assert [r["count"] for r in recs if r["event"] == "nonfinite"] == [1]
    steps = _steps(tmp_path)
    assert [r["skipped"] for r in steps] == [False, True, False]
    assert steps[1]["loss"] == "nan" and all(isinstance(r["loss"], float) for r in (steps[0], steps[2]))
    folder = CheckpointManager(str(tmp_path)).latest()
    # the skipped step neither moved the optimizer nor the schedule
    assert _optimizer_state(folder)["state"][0]["step"] == 2
    assert json.loads(open(os.path.join(folder, "trainer_state.json")).read())["scheduler"]["last_epoch"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["nonfinite_steps"] == 1


def test_too_many_nonfinite_losses_abort(tmp_path, monkeypatch):
    _nan_on(monkeypatch, None)
    t = _trainer(tmp_path, "--stage=gduf", "--gduf.steps=5", "--max_nonfinite=2", "--save_every=1000")
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(TrainingAborted, match=r"3 non-finite losses/gradients \(limit max_nonfinite=2\)"):
        t.run()
    assert len(_steps(tmp_path)) == 2  # the third non-finite step aborts before it is logged
    assert all(torch.equal(v, before[k]) for k, v in t.model.state_dict().items())
    assert not (tmp_path / "summary.json").exists()


# ---------------------------------------------------------------------------------------------- command line


def test_cli_help_and_bad_override(tmp_path):
    res = _run([sys.executable, "-m", "unigendet.train", "--help"], timeout=120)
    assert "usage: python -m unigendet.train" in res.stdout and "--optim.lr, --lr FLOAT" in res.stdout
    for bad, msg in (("--lr=fast", "expects float"), ("--nope=1", "unknown option"),
                     ("--stage=three", "stage must be gduf, diga or all"), ("--resume=maybe", "expects a boolean")):
        res = subprocess.run([sys.executable, "-m", "unigendet.train", bad, f"--out-dir={tmp_path}"],
                             capture_output=True, text=True, timeout=120, env=_env())
        assert res.returncode == 2, (bad, res.stderr)
        assert msg in res.stderr and "Traceback" not in res.stderr, (bad, res.stderr)
        assert res.stderr.startswith("unigendet.train: error: ") and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "train.jsonl").exists()


# ---------------------------------------------------------------------------------------------- end of run


@pytest.mark.slow
def test_short_full_run_writes_every_output(tmp_path):
    from unigendet.inference.loading import load_for_inference
    from unigendet.models import UniGenDet

    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "unigendet.train", *BASE, "--no-progress", f"--out-dir={out}", "--gduf.steps=2",
         "--diga.steps=2", "--eval_samples=4", "--eval_max_new_tokens=8", "--sample_images=2", "--sample_steps=2",
         "--gen_eval_samples=3"],
        capture_output=True, text=True, timeout=400, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out detection accuracy" in res.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["nonfinite_steps"] == 0
    assert set(summary["stages"]) == {"r1-gduf", "r1-diga"}
    proj = summary["throughput"]["paper_schedule_projection"]
    assert proj["bagel_7b_flops_per_token"] > 0 and summary["throughput"]["tokens_per_s"] > 0
    for name in ("losses.png", "samples.png", "detection_eval.json"):
        assert (out / name).stat().st_size > 0, name
    from PIL import Image

    with Image.open(out / "samples.png") as im:
        assert im.width > 0 and im.height > 0
    det = summary["detection"]
    assert det["n"] == 4 and 0.0 <= det["head_accuracy"] <= 1.0 and det["report"]
    gen = summary["generation"]  # held-out scene prompts: prompt score against the exact checks, FID
    assert gen["n"] == 3 and 0.0 <= gen["prompt_score"] <= 1.0 and gen["chance"] == 0.3125
    assert gen["fid"] is None or gen["fid"] >= 0.0
    assert summary["samples"] == str(out / "samples.png") and len(os.listdir(out / "generated")) == 3

    model, tok, packing = load_for_inference(str(out / "final"), device="cpu")
    assert isinstance(model, UniGenDet) and not model.training and tok.vocab_size > 0 and packing is not None
    ckpt = load_sharded(CheckpointManager(str(out)).latest())
    sd = model.state_dict()
    for k, v in ckpt.items():
        assert torch.equal(sd[k], v), k


@pytest.mark.slow
def test_coevolution_round_two_trains_the_detector_on_self_generated_fakes(tmp_path):
    from PIL import Image

    t = _trainer(tmp_path, "--rounds=2", "--gduf.steps=1", "--gduf.round_steps=2", "--diga.steps=1",
                 "--coevolution_fakes=2",
                 "--sample_steps=2", "--save_every=1000", "--gen_eval_samples=3", "--coevolution_heldout=2",
                 "--eval_samples=4", "--optim.warmup_steps=0", "--optim.schedule=constant")
    summary = t.run()
    # round 2 fine-tunes round 1's weights at round_lr_scale x the learning rate
    o = t.cfg.optim
    lrs = {(r["round"], r["stage"]): r["lr"] for r in _steps(tmp_path)}
    assert lrs[1, "gduf"] == pytest.approx(o.lr) and lrs[2, "gduf"] == pytest.approx(o.lr * o.round_lr_scale)
    assert o.round_lr_scale < 1.0
    # and for gduf.round_steps steps (diga.round_steps unset: as many as round 1)
    assert summary["stages"]["r1-gduf"]["steps"] == 1 and summary["stages"]["r2-gduf"]["steps"] == 2
    assert summary["stages"]["r2-diga"]["steps"] == 1
    # both detectors judged on the final generator's held-out samples, round 1's held-out samples and real photos
    co = summary["coevolution"]
    assert co["images"] == {"final_generator_heldout": 3, "round1_generator_heldout": 2, "real_photos": 2}
    for name in ("round1_detector", "round2_detector"):
        row = co["detectors"][name]
        assert 0.0 <= row["round1_generator_heldout"]["fake_rate"] <= 1.0
        assert row["real_photos"]["real_accuracy"] == 1.0 - row["real_photos"]["fake_rate"]
    assert list(summary["stages"]) == ["r1-gduf", "r1-diga", "r2-gduf", "r2-diga"]
    assert len(t.extra_fakes) == 2
    for rec in t.extra_fakes:
        assert rec.label == 0 and rec.image.startswith(str(tmp_path / "round2" / "fakes"))
        with Image.open(rec.image) as im:
            assert im.size[0] > 0
    assert {r.image for r in t._make_dataset(2, "gduf").det_records} >= {r.image for r in t.extra_fakes}
    assert not os.listdir(tmp_path / "round2" / "fakes") or all(
        n.endswith(".png") for n in os.listdir(tmp_path / "round2" / "fakes"))
    meta = CheckpointManager.load(CheckpointManager(str(tmp_path)).latest(), restore_rng=False)["trainer_state"]
    assert meta["round"] == 2 and [r["image"] for r in meta["extra_fakes"]] == [r.image for r in t.extra_fakes]


def test_lr_schedule_warmup_then_constant_or_cosine():
    from unigendet.train.config import OptimConfig
    from unigendet.train.optim import lr_multiplier

    const = lr_multiplier(OptimConfig(warmup_steps=4, schedule="constant"), 20)
    assert [const(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert const(19) == 1.0
    cos = lr_multiplier(OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), 20)
    assert [cos(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    vals = [cos(s) for s in range(4, 21)]
    assert vals[0] == 1.0 and all(a > b for a, b in zip(vals, vals[1:]))
    assert abs(cos(12) - 0.55) < 1e-12 and abs(cos(20) - 0.1) < 1e-12 and cos(100) == cos(20)
    with pytest.raises(ValueError, match="optim.schedule"):
        load_config("tiny", ["--optim.schedule=linear"])


def test_self_generated_fakes_keep_the_classes_balanced():
    from unigendet.data import DetectionRecord
    from unigendet.train.coevolution import detection_records_with

    def rec(i, label):
        return DetectionRecord(id=str(i), image=f"{i}.png", label=label, cate="c", question="q", answer="a")

    data = [rec(i, i % 2) for i in range(8)]  # 4 real, 4 fake
    mine = [rec(100 + i, 0) for i in range(3)]
    out = detection_records_with(data, mine, balance=True)
    assert sum(r.label == 0 for r in out) == sum(r.label == 1 for r in out) == 4
    assert [r.id for r in out] == ["0", "1", "3", "5", "7", "100", "101", "102"]  # its last fakes (2, 4, 6) gave way
    assert len(detection_records_with(data, mine, balance=False)) == 11
    many = [rec(200 + i, 0) for i in range(6)]  # more than the data set's fakes: every one of them gives way
    assert sum(r.label == 0 for r in detection_records_with(data, many, balance=True)) == 6
