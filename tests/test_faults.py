"""Fault injection: what survives which fault, each case asserting the exact outcome (a named error, a correct
result, or a bit-exact resume).

Training runs use the tiny preset with small packs and three GDUF steps (one shared reference run per module);
checkpoint, log and model-file cases use small tensors. ``pytest tests/test_faults.py`` runs them all.
"""

import errno
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from unigendet._integrity import (
    CheckpointError,
    NonFiniteWeightsError,
    atomic_folder,
    clean_temporaries,
    read_json,
    verify_checksums,
    write_checksums,
)
from unigendet.train import logs as logs_module
from unigendet.train.config import load_config
from unigendet.train.logs import JsonlLogger, read_jsonl
from unigendet.train.loop import Trainer, TrainingAborted
from unigendet.train.resume import ResumeError, check_trainer_state, config_changes
from unigendet.train.state import CheckpointManager, load_sharded

BASE = ["--lr=1e-4", "--optim.warmup_steps=0", "--data.expected_tokens=512", "--data.max_tokens=640",
        "--data.max_tokens_per_sample=512", "--data.det_ratio=1", "--data.gen_ratio=1", "--log_every=1",
        "--grad_accum=1", "--ema=0", "--eval_samples=0", "--sample_images=0", "--gen_eval_samples=0", "--stage=gduf",
        "--seed=7"]
STEPS = 3
RUN = [*BASE, f"--gduf.steps={STEPS}", "--save_every=1", "--keep_last=3"]


def _trainer(out, *overrides) -> Trainer:
    return Trainer(load_config("tiny", [*RUN, f"--out_dir={out}", *overrides]), progress=False)


def _events(out, name=None) -> list[dict]:
    recs = read_jsonl(os.path.join(out, "train.jsonl"))
    return [r for r in recs if name is None or r["event"] == name]


def _step_losses(out) -> dict[int, tuple]:
    """step -> (loss values) of every logged step (a step redone after a kill must log the same values)."""
    seen: dict[int, tuple] = {}
    for r in _events(out, "step"):
        vals = tuple(sorted((k, v) for k, v in r.items() if k.startswith("loss") or k in ("lr", "grad_norm")))
        assert seen.setdefault(r["step"], vals) == vals, f"step {r['step']} logged different values twice"
    return seen


def _assert_same_final(out, ref):
    got, want = load_sharded(os.path.join(out, "final")), load_sharded(os.path.join(ref, "final"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _ckpt(out, step) -> str:
    return os.path.join(out, "checkpoints", f"step_{step:07d}")


def _flip_byte_in_tensor_data(path: str) -> None:
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        size = os.path.getsize(path)
        pos = 8 + n + (size - 8 - n) // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x10]))


def _no_plot(records, path):
    return False


@pytest.fixture(autouse=True)
def _skip_loss_plots(request, monkeypatch):
    """The end-of-run loss plot is not under test here (it costs a second per run); ``real_plots`` keeps it."""
    if "real_plots" not in request.fixturenames:
        monkeypatch.setattr("unigendet.train.finish.plot_losses", _no_plot)


@pytest.fixture
def real_plots():
    return None


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One uninterrupted run: checkpoints after steps 1, 2 and 3, the final export and the log."""
    out = str(tmp_path_factory.mktemp("faults") / "ref")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("unigendet.train.finish.plot_losses", _no_plot)
        _trainer(out).run()
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", *(f"step_{s:07d}" for s in (1, 2, 3))]
    return out


@pytest.fixture
def run_copy(ref, tmp_path):
    """A copy of the reference run folder to damage."""
    out = str(tmp_path / "run")
    shutil.copytree(ref, out)
    return out


# ------------------------------------------------------------------------------------------- kill -9


def _cli(out, *extra):
    return [sys.executable, "-m", "unigendet.train", *BASE, "--save_every=1", "--keep_last=2", "--no-progress",
            f"--out-dir={out}", *extra]


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_kill_9_during_steps_and_saves_resumes_bit_exactly(tmp_path):
    """SIGKILL at random moments (mid-step, mid-save: a save follows every step); each --resume continues from the
    newest intact checkpoint and the result equals an uninterrupted run bit for bit. Then a resume with other
    options is refused with one line naming the difference."""
    seed = int(os.environ.get("UNIGENDET_FAULT_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    steps = ["--gduf.steps=6"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    res = subprocess.run(_cli(ref, *steps), capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    kills = []
    for attempt in range(2):
        after = rng.randint(1, 4) if attempt == 0 else rng.randint(1, 2)
        delay = rng.uniform(0.0, 0.15)
        start = len(_events(out, "step"))
        proc = subprocess.Popen(_cli(out, *steps, *(["--resume"] if attempt else [])), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=_env())
        try:
            deadline = time.monotonic() + 240
            while len(_events(out, "step")) < start + after and proc.poll() is None:
                assert time.monotonic() < deadline, "no training steps were logged"
                time.sleep(0.01)
            time.sleep(delay)
            proc.kill()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kills.append((after, round(delay, 3), proc.returncode))
    msg = f"seed {seed} (UNIGENDET_FAULT_SEED), kills (after step, delay, rc): {kills}"
    res = subprocess.run(_cli(out, *steps, "--resume"), capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, f"{msg}\n{res.stderr[-3000:]}"
    _assert_same_final(out, ref)
    assert _step_losses(out) == _step_losses(ref), msg
    assert not [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".")], msg

    res = subprocess.run(_cli(out, *steps, "--resume", "--lr=3e-4"), capture_output=True, text=True, timeout=300,
                         env=_env())
    # a refused resume is a user error: one line, exit status 2 (as every command's usage errors)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("unigendet.train: error:")]
    assert "optim.lr: 0.0001 -> 0.0003" in line and "--allow-config-change" in line


# ------------------------------------------------------------------------------------------- corrupt checkpoints


@pytest.mark.parametrize("kind", ["flipped byte in tensor data", "truncated trainer_state.json",
                                  "emptied safetensors"])
def test_corrupt_newest_checkpoint_walks_back_and_resumes_bit_exactly(ref, run_copy, kind):
    out = run_copy
    damage, reason = CORRUPTIONS[kind]
    damage(_ckpt(out, 3))
    n_before = len(_events(out))
    _trainer(out, "--resume=true").run()
    (skip,) = [r for r in _events(out)[n_before:] if r["event"] == "checkpoint_skipped"]
    assert skip["path"] == _ckpt(out, 3) and reason.split("{}")[0] in skip["reason"], skip
    (resume,) = _events(out, "resume")
    assert resume["path"] == _ckpt(out, 2)
    assert [r["step"] for r in _events(out)[n_before:] if r["event"] == "step"] == [3]
    _assert_same_final(out, ref)
    CheckpointManager(out).verify(_ckpt(out, 3))  # rewritten intact


def test_trainer_state_out_of_range_is_a_named_error(run_copy):
    folder = _ckpt(run_copy, 3)
    path = os.path.join(folder, "trainer_state.json")
    meta = read_json(path)
    meta["stage_step"] = -1
    with open(path, "w") as f:
        json.dump(meta, f)
    write_checksums(folder)  # authentic as far as the checksums go: only the range check can catch it
    t = _trainer(run_copy, "--resume=true")
    with pytest.raises(ResumeError, match=r"step_0000003/trainer_state.json: stage_step = -1 is out of range "
                                          r"\[0, 3\] \(gduf.steps = 3\)"):
        t.run()
    assert len(_events(run_copy, "step")) == STEPS  # nothing trained


# ------------------------------------------------------------------------------------------- configuration change


def test_resume_with_a_changed_config_is_refused_unless_allowed(run_copy):
    n = len(_events(run_copy))
    with pytest.raises(ResumeError, match=r"differs from the one .*step_0000003 was written with: "
                                          r"gduf.w_det: 5.0 -> 2.0; optim.lr: 0.0001 -> 0.0002\. .*"
                                          "--allow-config-change"):
        _trainer(run_copy, "--resume=true", "--lr=2e-4", "--gduf.w_det=2").run()
    assert [r["event"] for r in _events(run_copy)[n:]] == []  # refused before anything was logged or trained

    # Reporting, saving and end-of-run options may change freely.
    t = _trainer(run_copy, "--resume=true", "--log_every=5", "--save_every=7", "--keep_last=4", "--max_nonfinite=3")
    assert t._load_resume()["stage_step"] == STEPS
    assert not _events(run_copy, "config_change")

    t = _trainer(run_copy, "--resume=true", "--lr=2e-4", "--allow_config_change=true")
    t.run()
    assert [(r["field"], r["checkpoint"], r["now"]) for r in _events(run_copy, "config_change")] == [
        ("optim.lr", 1e-4, 2e-4)]
    assert os.path.isfile(os.path.join(run_copy, "summary.json"))


def test_config_changes_ignore_only_the_resume_mutable_fields():
    a = load_config("tiny", ["--out_dir=a"])
    stored = json.loads(json.dumps(__import__("dataclasses").asdict(a)))
    b = load_config("tiny", ["--out_dir=b", "--resume=true", "--allow_config_change=true", "--log_every=9",
                             "--data.num_workers=3", "--eval_samples=1"])
    assert config_changes(stored, b) == []
    c = load_config("tiny", ["--betas=0.9,0.99", "--data.backend=dali", "--seed=1"])
    assert config_changes(stored, c) == [("data.backend", "torch", "dali"), ("optim.betas", [0.9, 0.95], [0.9, 0.99]),
                                         ("seed", 0, 1)]
    del stored["gduf"]["w_det"]
    assert ("gduf.w_det", "(absent)", 5.0) in config_changes(stored, a)


@pytest.mark.parametrize("field, value, message", [
    ("stage_step", -1, r"stage_step = -1 is out of range \[0, 3\]"),
    ("stage_step", 10**9, r"stage_step = 1000000000 is out of range \[0, 3\] \(gduf.steps = 3\)"),
    ("stage_step", "2", r"stage_step must be an integer, got '2'"),
    ("stage", "gdfu", r"stage must be 'gduf' or 'diga', got 'gdfu'"),
    ("stage", "diga", r"the checkpoint is in stage 'diga', which this run \(stage=gduf\) does not train"),
    ("round", 2, r"round = 2 is out of range \[1, 1\] \(this run has rounds=1\)"),
    ("next_pack", [10**7], r"next_pack\[0\] = 10000000 does not fit 2 steps"),
    ("next_pack", [-1], r"next_pack must be a list of 1 non-negative integers"),
    ("next_pack", [2, 3], r"next_pack must be a list of 1 non-negative integers"),
    ("empty_packs", None, r"empty_packs must be a list of 1 non-negative integers"),
    ("world_size", 2, r"written by 2 processes, this run has 1"),
    ("global_step", 1, r"global_step = 1 is out of range >= 2"),
    ("nonfinite", -3, r"nonfinite = -3 is out of range >= 0"),
    ("completed", ["r1-gduf"], r"stage r1-gduf is both in progress and completed"),
    ("completed", "r1", r"completed must be a list of stage keys"),
    ("scheduler", {"last_epoch": 9}, r"scheduler: last_epoch = 9 is out of range \[0, 2\]"),
])
def test_trainer_state_values_are_range_checked(ref, field, value, message):
    meta = read_json(os.path.join(_ckpt(ref, 2), "trainer_state.json"))
    cfg = load_config("tiny", RUN)
    check_trainer_state(meta, cfg, 1, "ck")  # the real state passes
    meta[field] = value
    with pytest.raises(ResumeError, match=r"^ck/trainer_state.json: " + message):
        check_trainer_state(meta, cfg, 1, "ck")


# ------------------------------------------------------------------------------------------- logs


def test_torn_log_line_is_skipped_counted_and_cannot_swallow_the_next_record(ref, run_copy, real_plots):
    """A crash tore the last line of train.jsonl (and the last checkpoint was never written): the resumed run closes
    the torn line, logs normally, and the end of run reads, plots and summarises the log, counting the torn line."""
    out = run_copy
    shutil.rmtree(_ckpt(out, 3))
    with open(os.path.join(out, "train.jsonl"), "a") as f:
        f.write('{"time": 1.0, "event": "st')
    _trainer(out, "--resume=true").run()
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert summary["log_lines_skipped"] == 1 and summary["log_records_lost"] == 0
    assert summary["loss_plot"] == os.path.join(out, "losses.png")
    recs = read_jsonl(os.path.join(out, "train.jsonl"))
    assert recs.skipped == 1 and recs[-1]["event"] == "checkpoint"
    assert [r["event"] for r in recs].count("resume") == 1
    _assert_same_final(out, ref)


def test_read_jsonl_skips_and_counts_bad_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"event": "a"}\n[1, 2]\n{"event": "b", "x": \xff\xfe}\n\n{"event": "c"}\n{"event": ')
    recs = read_jsonl(str(path))
    assert [r["event"] for r in recs] == ["a", "c"] and recs.skipped == 3
    missing = read_jsonl(str(tmp_path / "missing.jsonl"))
    assert missing == [] and missing.skipped == 0


def _full_disk_os(real_os, fail_on: set[int], counter: list[int]):
    """A stand-in ``os`` module whose ``write`` writes half of the record and then fails with ENOSPC on the given
    calls (1-based)."""
    def write(fd, data):
        counter[0] += 1
        if counter[0] in fail_on:
            real_os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_os.write(fd, data)

    proxy = types.SimpleNamespace(**{k: getattr(real_os, k) for k in dir(real_os) if not k.startswith("__")})
    proxy.write = write
    return proxy


def test_full_disk_during_a_log_write_drops_the_record_and_leaves_no_torn_line(tmp_path, monkeypatch):
    path = str(tmp_path / "train.jsonl")
    calls = [0]
    monkeypatch.setattr(logs_module, "os", _full_disk_os(os, {2, 3}, calls))
    lg = JsonlLogger(path)
    for i in range(5):
        lg.log("step", step=i)
    assert lg.failed == 2
    recs = read_jsonl(path)
    assert [r["step"] for r in recs] == [0, 3, 4] and recs.skipped == 0


def test_full_disk_during_a_training_log_write_does_not_stop_training(ref, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    calls = [0]
    # records: start, step 1, checkpoint 1, step 2 (fails), ...
    monkeypatch.setattr(logs_module, "os", _full_disk_os(os, {4}, calls))
    t = _trainer(out)
    summary = t.run()
    assert summary["log_records_lost"] == 1 and summary["log_lines_skipped"] == 0
    assert [r["step"] for r in _events(out, "step")] == [1, 3]
    _assert_same_final(out, ref)


# ------------------------------------------------------------------------------------------- full disk, NaN weights


def test_full_disk_during_a_checkpoint_save_keeps_the_previous_one_and_resume_is_exact(ref, tmp_path, monkeypatch):
    import unigendet._shards as shards

    out = str(tmp_path / "run")
    real = shards.save_file
    calls = [0]

    def save_file(tensors, path, metadata=None):  # the second checkpoint's shard: half written, then ENOSPC
        calls[0] += 1
        real(tensors, path, metadata=metadata)
        if calls[0] == 2:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "save_file", save_file)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step_0000002: \[Errno 28\] No space "
                                              r"left on device; .*step_0000001 is intact"):
        _trainer(out).run()
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step_0000001"]  # no temporary folder left
    assert open(os.path.join(root, "latest")).read().strip() == "step_0000001"
    monkeypatch.setattr(shards, "save_file", real)  # space freed
    _trainer(out, "--resume=true").run()
    _assert_same_final(out, ref)
    assert _step_losses(out) == _step_losses(ref)


def test_nonfinite_weights_are_never_saved_and_the_good_checkpoint_is_kept(tmp_path, monkeypatch):
    """Weights turned NaN during step 2 (its loss was already computed): the step-2 checkpoint is refused with a
    named error listing the bad key, and with keep_last=1 the step-1 checkpoint is still there."""
    import unigendet.train.loop as loop

    out = str(tmp_path / "run")
    orig = loop.stage_losses
    seen = [0]
    trainer = _trainer(out, "--keep_last=1")

    def losses(o, stage, scfg):
        res = orig(o, stage, scfg)
        seen[0] += 1
        if seen[0] == 2:
            with torch.no_grad():
                trainer.model.connector.fc1.bias.fill_(float("nan"))
        return res

    monkeypatch.setattr(loop, "stage_losses", losses)
    with pytest.raises(TrainingAborted, match=r"checkpoint step_0000002: model weights: non-finite values \(NaN/inf\) "
                                              r"in 1 tensor\(s\): connector.fc1.bias; no checkpoint written, the last "
                                              r"good one is .*step_0000001"):
        trainer.run()
    cm = CheckpointManager(out, keep_last=1)
    assert cm.list() == ["step_0000001"] and cm.latest() == _ckpt(out, 1)
    cm.verify(_ckpt(out, 1))
    (refused,) = _events(out, "checkpoint_refused")
    assert refused["step"] == 2 and "connector.fc1.bias" in refused["reason"]
    assert not os.path.exists(os.path.join(out, "summary.json"))


# ------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("phase", ["planning", "export", "evaluation"])
def test_sigterm_is_honoured_at_once_outside_a_step(ref, run_copy, tmp_path, monkeypatch, phase):
    """A signal during data planning (before the first step), the export or the evaluation (of a resumed, trained
    run) stops the run at once (exit 128 + 15, an "interrupted" record); nothing after it runs, an interrupted
    export leaves no temporary, and a resume then completes the run."""
    from unigendet.data.loader import PackedDataset

    out = str(tmp_path / "fresh") if phase == "planning" else run_copy
    ran_on = []

    def signal_then_work():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200):  # the rest of the phase: never reached when the signal is honoured
            time.sleep(0.01)
            ran_on.append(phase)

    if phase == "planning":
        real = PackedDataset.plan_packs

        def plan_packs(self, *a, **k):
            signal_then_work()
            yield from real(self, *a, **k)

        monkeypatch.setattr(PackedDataset, "plan_packs", plan_packs)
    elif phase == "export":  # the signal comes half-way through writing the export (weights written, configs not)
        import unigendet.models.checkpoint as ck

        monkeypatch.setattr(ck, "save_config", lambda *a, **k: signal_then_work())
    else:
        monkeypatch.setattr(Trainer, "evaluate_detection", lambda self, recs: signal_then_work() or {})
    extra = [] if phase == "planning" else ["--resume=true"]
    extra += ["--eval_samples=2"] if phase == "evaluation" else []
    if phase != "planning":
        os.remove(os.path.join(out, "summary.json"))
        shutil.rmtree(os.path.join(out, "final"))
    with pytest.raises(SystemExit) as exc:
        _trainer(out, *extra).run()
    assert exc.value.code == 128 + signal.SIGTERM and ran_on == []
    (rec,) = _events(out, "interrupted")
    assert rec["signal"] == signal.SIGTERM
    assert len(_events(out, "step")) == (0 if phase == "planning" else STEPS)
    assert not os.path.exists(os.path.join(out, "summary.json"))
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # an interrupted export leaves no temporary
    assert os.path.isdir(os.path.join(out, "final")) == (phase == "evaluation")
    if phase == "export":
        monkeypatch.undo()
        _trainer(out, "--resume=true").run()
        _assert_same_final(out, ref)
        assert os.path.isfile(os.path.join(out, "summary.json"))


# ------------------------------------------------------------------------------------------- temporaries


def test_stale_temporaries_are_cleaned_at_start_and_an_interrupted_replace_is_undone(run_copy):
    out = run_copy
    root = os.path.join(out, "checkpoints")
    os.makedirs(os.path.join(root, ".tmp-step_0000009-abc123"))
    os.makedirs(os.path.join(root, ".step_0000004.tmp-x1"))
    open(os.path.join(root, ".latest-zz"), "w").close()
    os.makedirs(os.path.join(out, ".final.tmp-deadbeef"))
    os.makedirs(os.path.join(out, "round1", "gduf_model.tmp"))
    # a kill between the two renames of replacing `final`: the previous export is under .final.old-*/final
    os.makedirs(os.path.join(out, ".final.old-1"))
    os.rename(os.path.join(out, "final"), os.path.join(out, ".final.old-1", "final"))
    _trainer(out, "--resume=true")
    assert sorted(os.listdir(root)) == ["latest", "step_0000001", "step_0000002", "step_0000003"]
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    assert os.listdir(os.path.join(out, "round1")) == ["gduf_model"]
    assert {r["path"] for r in _events(out, "stale_temporary_removed")} >= {
        os.path.join(root, ".tmp-step_0000009-abc123"), os.path.join(out, ".final.tmp-deadbeef")}
    verify_checksums(os.path.join(out, "final"))  # put back intact


# ------------------------------------------------------------------------------------------- checkpoint manager


def _small_state(fill=None):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    if fill is not None:
        sd["bias"][1] = fill
    return sd, opt


def _manager_with(tmp_path, steps, keep_last=5):
    cm = CheckpointManager(str(tmp_path), keep_last=keep_last)
    sd, opt = _small_state()
    for s in steps:
        cm.save(step=s, model_state=sd, optimizer=opt, trainer_state={"at": s})
    return cm


def _truncate(path, keep=None):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 if keep is None else keep)


def _bad_header(path):
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"#")


CORRUPTIONS = {
    "truncated safetensors": (lambda d: _truncate(os.path.join(d, "model-00001-of-00001.safetensors")),
                              "model-00001-of-00001.safetensors: {} bytes, checksums.json says"),
    "emptied safetensors": (lambda d: _truncate(os.path.join(d, "optimizer.safetensors"), 0),
                            "optimizer.safetensors: 0 bytes, checksums.json says"),
    "bad header": (lambda d: _bad_header(os.path.join(d, "rng.safetensors")), "rng.safetensors: SHA-256 mismatch"),
    "truncated trainer_state.json": (lambda d: _truncate(os.path.join(d, "trainer_state.json")),
                                     "trainer_state.json: {} bytes"),
    "flipped byte in tensor data": (
        lambda d: _flip_byte_in_tensor_data(os.path.join(d, "model-00001-of-00001.safetensors")),
        "model-00001-of-00001.safetensors: SHA-256 mismatch"),
    "deleted file": (lambda d: os.remove(os.path.join(d, "rng.safetensors")), "rng.safetensors: missing"),
    "no checksums": (lambda d: os.remove(os.path.join(d, "checksums.json")), "no checksums.json"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_skipped_with_its_reason(tmp_path, kind):
    cm = _manager_with(tmp_path, [1, 2])
    damage, reason = CORRUPTIONS[kind]
    folder = os.path.join(cm.root, "step_0000002")
    damage(folder)
    reason = reason.replace("{}", str(os.path.getsize(os.path.join(folder, reason.split(":")[0])))
                            if "{}" in reason else "")
    with pytest.raises(CheckpointError, match="step_0000002"):
        CheckpointManager.load(folder)
    skipped = []
    loaded = CheckpointManager(str(tmp_path)).load_newest_intact(on_skip=lambda f, r: skipped.append((f, r)))
    assert loaded["folder"].endswith("step_0000001") and loaded["trainer_state"]["at"] == 1
    ((where, why),) = skipped
    assert where == folder and reason in why, why


@pytest.mark.parametrize("kind", ["truncated safetensors", "emptied safetensors", "bad header",
                                  "truncated trainer_state.json"])
def test_damage_the_checksums_were_rewritten_for_is_still_caught_by_parsing(tmp_path, kind):
    """A damaged file whose checksum was recomputed (e.g. copied with a tool that rewrote the manifest) still fails
    to load, with an error naming the file."""
    cm = _manager_with(tmp_path, [1])
    folder = os.path.join(cm.root, "step_0000001")
    damage = dict(CORRUPTIONS)[kind][0]
    damage(folder)
    write_checksums(folder)
    name = {"truncated safetensors": "model-00001-of-00001.safetensors", "emptied safetensors": "optimizer.safetensors",
            "bad header": "rng.safetensors", "truncated trainer_state.json": "trainer_state.json"}[kind]
    what = "truncated JSON" if name.endswith(".json") else "not a readable safetensors file"
    with pytest.raises(CheckpointError, match=f"{name}: {what}"):
        opt = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters())
        CheckpointManager.load(folder, opt)


def test_every_checkpoint_corrupt_is_a_named_error_listing_each(tmp_path):
    cm = _manager_with(tmp_path, [1, 2])
    for s in (1, 2):
        _flip_byte_in_tensor_data(os.path.join(cm.root, f"step_{s:07d}", "model-00001-of-00001.safetensors"))
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*: step_0000002: .*SHA-256 mismatch.*; "
                                              r"step_0000001: .*SHA-256 mismatch"):
        CheckpointManager(str(tmp_path)).load_newest_intact()
    assert CheckpointManager(str(tmp_path / "empty")).load_newest_intact() is None


def test_nan_weights_in_a_verified_checkpoint_are_skipped(tmp_path):
    cm = _manager_with(tmp_path, [1, 2])
    folder = os.path.join(cm.root, "step_0000002")
    shard = os.path.join(folder, "model-00001-of-00001.safetensors")
    sd = load_file(shard)
    sd["weight"][0, 0] = float("inf")
    save_file(sd, shard, metadata={"format": "pt"})
    write_checksums(folder)
    skipped = []
    loaded = CheckpointManager(str(tmp_path)).load_newest_intact(on_skip=lambda f, r: skipped.append(r))
    assert loaded["folder"].endswith("step_0000001")
    assert skipped == [f"{folder}/model: non-finite values (NaN/inf) in 1 tensor(s): weight"]


def test_a_good_checkpoint_is_never_pruned_in_favour_of_a_bad_one(tmp_path):
    cm = _manager_with(tmp_path, [1, 2], keep_last=2)
    _flip_byte_in_tensor_data(os.path.join(cm.root, "step_0000002", "model-00001-of-00001.safetensors"))
    cm = CheckpointManager(str(tmp_path), keep_last=2)  # a new process: nothing verified yet
    sd, opt = _small_state()
    cm.save(step=3, model_state=sd, optimizer=opt, trainer_state={})
    assert cm.list() == ["step_0000001", "step_0000002", "step_0000003"]  # 2 is bad: 1 is still one of the 2 good
    cm.save(step=4, model_state=sd, optimizer=opt, trainer_state={})
    assert cm.list() == ["step_0000003", "step_0000004"]
    bad, _ = _small_state(fill=float("nan"))
    with pytest.raises(NonFiniteWeightsError, match=r"checkpoint step_0000005: model weights: .* tensor\(s\): bias"):
        cm.save(step=5, model_state=bad, optimizer=opt, trainer_state={})
    assert cm.list() == ["step_0000003", "step_0000004"] and cm.latest().endswith("step_0000004")
    assert not [n for n in os.listdir(cm.root) if n.startswith(".")]


def test_atomic_folder_keeps_the_old_folder_on_failure_and_restores_it_after_a_kill(tmp_path):
    target = str(tmp_path / "final")
    with atomic_folder(target) as tmp:
        open(os.path.join(tmp, "a.txt"), "w").write("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_folder(target) as tmp:
        open(os.path.join(tmp, "a.txt"), "w").write("new")
        raise RuntimeError("boom")
    assert open(os.path.join(target, "a.txt")).read() == "old" and os.listdir(tmp_path) == ["final"]
    with pytest.raises(CheckpointError, match=r"could not write .*final: \[Errno 28\] No space left on device"):
        with atomic_folder(target) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device")
    assert open(os.path.join(target, "a.txt")).read() == "old" and os.listdir(tmp_path) == ["final"]
    verify_checksums(target)
    # a kill between "move the old folder aside" and "rename the new one in"
    os.makedirs(tmp_path / ".final.old-k")
    os.rename(target, tmp_path / ".final.old-k" / "final")
    os.makedirs(tmp_path / ".final.tmp-k")
    assert sorted(clean_temporaries(str(tmp_path))) == [str(tmp_path / ".final.old-k"), str(tmp_path / ".final.tmp-k")]
    assert os.listdir(tmp_path) == ["final"] and open(os.path.join(target, "a.txt")).read() == "old"


# ------------------------------------------------------------------------------------------- model files


def _tiny_folder(tmp_path):
    from unigendet.models import UniGenDet, get_config, save_checkpoint

    torch.manual_seed(0)
    m = UniGenDet(get_config("tiny"))
    folder = str(tmp_path / "export")
    save_checkpoint(m, folder)
    return m, folder


def _load(folder, **kw):
    from unigendet.models import load_pretrained

    return load_pretrained(folder, dtype=torch.float32, load_tokenizer=False, **kw)


def test_exported_model_is_verified_and_checked_finite_on_load(tmp_path):
    from unigendet.models import save_checkpoint

    m, folder = _tiny_folder(tmp_path)
    assert _load(folder).report.complete
    shard = os.path.join(folder, "model-00001-of-00001.safetensors")
    _flip_byte_in_tensor_data(shard)
    with pytest.raises(CheckpointError, match="model-00001-of-00001.safetensors: SHA-256 mismatch"):
        _load(folder)
    # NaN weights that no checksum flags (a folder without checksums.json, as a downloaded base): named keys
    sd = load_file(shard)
    sd["connector.fc1.bias"][0] = float("nan")
    sd["vae2llm.weight"][1, 1] = float("-inf")
    save_file(sd, shard, metadata={"format": "pt"})
    os.remove(os.path.join(folder, "checksums.json"))
    with pytest.raises(NonFiniteWeightsError, match=r"model-00001-of-00001.safetensors: non-finite values \(NaN/inf\) "
                                                    r"in 2 tensor\(s\): connector.fc1.bias, vae2llm.weight"):
        _load(folder)
    with torch.no_grad():
        m.connector.fc1.bias[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="connector.fc1.bias"):
        save_checkpoint(m, str(tmp_path / "nan_export"))
    assert not os.path.exists(tmp_path / "nan_export")


def test_index_may_not_point_outside_its_folder_and_bad_files_are_named(tmp_path):
    from unigendet.models.checkpoint import INDEX_NAME, resolve_checkpoint

    _, folder = _tiny_folder(tmp_path)
    os.remove(os.path.join(folder, "checksums.json"))
    index = os.path.join(folder, INDEX_NAME)
    good = read_json(index)
    key = next(iter(good["weight_map"]))
    shutil.copy(os.path.join(folder, "model-00001-of-00001.safetensors"), tmp_path / "other.safetensors")
    for target in ("../other.safetensors", str(tmp_path / "other.safetensors")):
        with open(index, "w") as f:
            json.dump({"weight_map": {**good["weight_map"], key: target}}, f)
        with pytest.raises(CheckpointError, match=rf"weight_map\['{key}'\] = .*points outside the folder"):
            resolve_checkpoint(folder)
    with open(index, "w") as f:
        f.write(json.dumps(good)[:50])
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: truncated JSON \(.* line 1 column"):
        resolve_checkpoint(folder)
    with open(index, "w") as f:
        json.dump({"weight_map": ["x"]}, f)
    with pytest.raises(CheckpointError, match="'weight_map' must be an object"):
        resolve_checkpoint(folder)
    with open(index, "w") as f:
        json.dump(good, f)
    _truncate(os.path.join(folder, "model-00001-of-00001.safetensors"), 100)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001.safetensors: not a readable safetensors file"):
        _load(folder)


def _config_folder(tmp_path, name, mutate):
    from unigendet.models import get_config, save_config

    folder = str(tmp_path / "cfg")
    save_config(get_config("tiny"), folder)
    path = os.path.join(folder, name)
    if isinstance(mutate, str):
        with open(path, "w") as f:
            f.write(mutate)
    else:
        data = json.loads(open(path).read())
        with open(path, "w") as f:
            json.dump(mutate(data), f)
    return folder, path


def _set(key, value):
    return lambda d: {**d, key: value}


def _drop(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("name, mutate, message", [
    ("llm_config.json", _set("num_attention_heads", 0), "field 'num_attention_heads' must be an integer in [1, 1024]"),
    ("llm_config.json", _set("vocab_size", 10**12), "field 'vocab_size' must be an integer in [1, 4194304], got "
                                                    "1000000000000"),
    ("llm_config.json", _set("num_hidden_layers", 100000), "field 'num_hidden_layers' must be an integer in [1, 1024]"),
    ("llm_config.json", _set("hidden_size", -128), "field 'hidden_size' must be an integer in [1, 65536], got -128"),
    ("llm_config.json", _set("vocab_size", "2048"), "field 'vocab_size' must be an integer, got '2048'"),
    ("llm_config.json", _set("rms_norm_eps", None), "field 'rms_norm_eps' must be a finite number, got None"),
    ("llm_config.json", _drop("intermediate_size"), "missing required field 'intermediate_size'"),
    ("llm_config.json", lambda d: [d], "must hold a JSON object, got list"),
    ("llm_config.json", '{"hidden_size": 12', "truncated JSON (Expecting ',' delimiter at line 1 column 19)"),
    ("llm_config.json", _set("num_key_value_heads", 8),
     "'num_key_value_heads' (8) must be at most num_attention_heads"),
    ("vit_config.json", _set("patch_size", 0), "field 'patch_size' must be an integer in [1, 1024], got 0"),
    ("vit_config.json", _set("patch_size", 100), "field 'patch_size' (100) must be at most image_size (56)"),
    ("vit_config.json", _set("num_attention_heads", 1.5), "field 'num_attention_heads' must be an integer, got 1.5"),
    ("vit_config.json", _drop("image_size"), "missing required field 'image_size'"),
    ("unigendet_config.json", _set("vae", {"kind": "space_to_depth", "z_channels": -1}),
     "field 'z_channels' must be an integer in [1, 4096], got -1"),
    ("unigendet_config.json", _set("latent_patch_size", 0), "field 'latent_patch_size' must be an integer in [1, 64]"),
    ("unigendet_config.json", _set("visual_gen", "yes"), "field 'visual_gen' must be true or false, got 'yes'"),
    ("unigendet_config.json", _set("extra_knob", 1), "unknown keys ['extra_knob']"),
])
def test_model_config_files_are_validated_naming_file_and_field(tmp_path, name, mutate, message):
    from unigendet.models import load_config
    from unigendet.models.config import ConfigError

    folder, path = _config_folder(tmp_path, name, mutate)
    with pytest.raises(ConfigError) as exc:
        load_config(folder)
    assert str(exc.value).startswith(path) and message in str(exc.value), str(exc.value)


def test_a_model_too_large_for_the_device_is_refused_before_allocation(tmp_path, monkeypatch):
    import unigendet.models.checkpoint as ck
    from unigendet.models.config import ConfigError

    _, folder = _tiny_folder(tmp_path)
    monkeypatch.setattr(ck, "_device_memory", lambda device: 1 << 20)  # a 1 MiB device
    with pytest.raises(ConfigError, match=r"export: the configured model needs .* GiB for its weights, more than "
                                          r"the 0.0 GiB of cpu memory"):
        _load(folder)
